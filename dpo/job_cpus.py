"""The CPUs and GPUs a job can use: those free when it joined Ray, not the cluster's total.

Under `ray job submit --entrypoint-num-cpus N` the driver's supervisor holds N
CPUs for the whole job, and `ray.cluster_resources()` still counts them; so do
other jobs' actors. A plan that needs more than is free waits forever, without
an error, so the stages refuse it before they start anything.

The jobs note what is free right after ray.init (`note_free_cpus`), before any
of their own actors start: a check made later in the job (the eval stage after
the train stage, training after scoring) would otherwise count the job's own
actors, still shutting down, as taken. Without a note (a library caller's own
ray.init) the checks count the cluster's total.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dpo.errors import UserError


@dataclass(frozen=True)
class JobResource:
    free: float
    total: float

    @property
    def held(self) -> float:
        return self.total - self.free


_free_at_start: dict[str, dict[str, float]] = {}  # by Ray job id, by resource (CPU, GPU)


def note_free_cpus() -> None:
    import ray

    free = ray.available_resources()
    _free_at_start[ray.get_runtime_context().get_job_id()] = {name: free.get(name, 0.0) for name in ("CPU", "GPU")}


def job_resource(name: str = "CPU") -> Optional[JobResource]:
    """This Ray job's CPUs (or GPUs); None without Ray, or on a cluster that has none yet (an autoscaler adds
    them; a wait for them is then run.stall_timeout_s's, dpo.stall)."""
    import ray

    if not ray.is_initialized():
        return None
    total = ray.cluster_resources().get(name, 0.0)
    if not total:
        return None
    free = _free_at_start.get(ray.get_runtime_context().get_job_id(), {}).get(name, total)
    return JobResource(free=min(free, total), total=total)


def refuse_unless_fits(need: float, what: str, lower: str, fixed: float = 0.0, resource: str = "CPU") -> None:
    """Refuse a plan of `need` CPUs or GPUs (`what` says what takes them) that this job's cannot hold.

    `lower` names the keys that shrink the plan, down to `fixed` that no key
    removes. The message says who holds the rest and offers each fix that can
    work: a smaller plan, the driver sharing its CPUs, more of the resource.
    """
    have = job_resource(resource)
    if have is None or need <= have.free + 1e-9:
        return
    held = (f" ({have.held:g} held already: by this job's driver under ray job submit --entrypoint-num-cpus, "
            "or by other jobs)" if have.held > 0 and resource == "CPU" else
            f" ({have.held:g} held already, by other jobs)" if have.held > 0 else "")
    fixes = [f"lower {lower} (to {have.free - fixed:g} {resource}s in all)"] if have.free - fixed > 1e-9 else []
    if have.held > 0 and resource == "CPU":
        fixes.append("submit with --entrypoint-num-cpus 0 (the driver then shares its CPUs)")
    fixes.append(f"add {resource}s to the cluster")
    raise UserError(f"{what} need {need:g} {resource}s, but this job can use {have.free:g} of the cluster's "
                    f"{have.total:g}{held}, so it would wait forever; {', or '.join(fixes)}")


def bundle_text(bundle: dict) -> str:
    """{CPU: 1, GPU: 1}: what a task, actor or worker asks Ray for, as messages show it."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(bundle.items())) + "}"


def free_text(names) -> str:
    """CPU 1 of 2, GPU 0 of 0: how much of each resource is free now, of the cluster's total."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return ", ".join(f"{name} {free.get(name, 0):g} of {total.get(name, 0):g}" for name in sorted(names))
