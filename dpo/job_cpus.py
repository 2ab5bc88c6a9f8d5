"""The CPUs a job can use: those free when it joined Ray, not the cluster's total.

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
class JobCpus:
    free: float
    total: float

    @property
    def held(self) -> float:
        return self.total - self.free


_free_at_start: dict[str, float] = {}  # by Ray job id


def note_free_cpus() -> None:
    import ray

    _free_at_start[ray.get_runtime_context().get_job_id()] = ray.available_resources().get("CPU", 0.0)


def job_cpus() -> Optional[JobCpus]:
    """This Ray job's CPUs; None without Ray, or on a cluster that has none yet (an autoscaler adds them)."""
    import ray

    if not ray.is_initialized():
        return None
    total = ray.cluster_resources().get("CPU", 0.0)
    if not total:
        return None
    free = _free_at_start.get(ray.get_runtime_context().get_job_id(), total)
    return JobCpus(free=min(free, total), total=total)


def refuse_unless_fits(need: float, what: str, lower: str, fixed: float = 0.0) -> None:
    """Refuse a plan of `need` CPUs (`what` says what takes them) that this job's CPUs cannot hold.

    `lower` names the keys that shrink the plan, down to `fixed` CPUs that no key
    removes. The message says who holds the rest and offers each fix that can
    work: a smaller plan, the driver sharing its CPUs, more CPUs.
    """
    cpus = job_cpus()
    if cpus is None or need <= cpus.free + 1e-9:
        return
    held = (f" ({cpus.held:g} held already: by this job's driver under ray job submit --entrypoint-num-cpus, "
            "or by other jobs)" if cpus.held > 0 else "")
    fixes = [f"lower {lower} (to {cpus.free - fixed:g} CPUs in all)"] if cpus.free - fixed > 1e-9 else []
    if cpus.held > 0:
        fixes.append("submit with --entrypoint-num-cpus 0 (the driver then shares its CPUs)")
    fixes.append("add CPUs to the cluster")
    raise UserError(f"{what} need {need:g} CPUs, but this job can use {cpus.free:g} of the cluster's "
                    f"{cpus.total:g}{held}, so it would wait forever; {', or '.join(fixes)}")
