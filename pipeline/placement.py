"""Tensor-parallel scoring: the placement group that holds one scoring actor's GPUs.

vLLM with tensor parallelism starts one Ray actor per rank inside the
placement group of the process that builds the engine. A Ray Data pool actor
cannot be given a group of its own from outside: Ray Data calls
`ray_remote_args_fn` not only to start an actor but also to inspect its
arguments (the memory issue detector, when execution starts and then
periodically, Ray 2.60), so a group made there is made again and again, and
the spare groups hold the GPUs the pool's actor waits for, forever. The
scoring actor therefore makes its group itself and builds the engine in a host
actor inside it.

Groups are named `<pool prefix>-<scoring actor id>`. A scoring actor that Ray
restarts after a crash keeps its id and finds its group again instead of
asking for more GPUs; one whose engine fails to start removes its group before
it dies, so that Ray Data's replacement can have the GPUs. A group outlives
the actor that made it (Ray frees it with the job), so the driver removes the
pool's groups when the stage ends (`release_placement_groups`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

log = logging.getLogger(__name__)

# A group waits for free GPUs (or for an autoscaler to add a node) as long as it takes: say so now and then.
WAIT_REPORT_S = 60


def _group(name: str, bundles: list[dict]):
    import ray

    try:
        return ray.util.get_placement_group(name)
    except ValueError:  # no live group of that name: this actor's first start
        return ray.util.placement_group(bundles, strategy="STRICT_PACK", name=name)


class GroupHostedScorer:
    """`scorer_cls(*args)` running in a host actor inside this actor's own group of `gpus` one-GPU bundles.

    The host takes the first bundle, which also holds the `cpus`; child tasks
    and actors it starts (vLLM's rank workers) are placed in the group too.
    `score` forwards to the host. A dead host is a dead scoring actor: this
    process exits, so that Ray restarts it (reference.max_restarts) and retries
    the batch, as for a crash of a one-GPU actor.
    """

    def __init__(self, scorer_cls: type, args: Sequence[Any], *, gpus: int, cpus: float, group_prefix: str):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        name = f"{group_prefix}-{ray.get_runtime_context().get_actor_id()}"
        self.group = _group(name, [{"GPU": 1, "CPU": cpus}] + [{"GPU": 1}] * (gpus - 1))
        try:
            ready = self.group.ready()
            while not ray.wait([ready], timeout=WAIT_REPORT_S)[0]:
                log.warning("scoring actor still waits for placement group %s: %d GPUs on one node; the cluster "
                            "has %s GPUs free", name, gpus, ray.available_resources().get("GPU", 0))
            self.host = ray.remote(scorer_cls).options(
                num_cpus=cpus, num_gpus=0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
            ).remote(*args)
            ray.get(self.host.__ray_ready__.remote())
        except BaseException:
            ray.util.remove_placement_group(self.group)
            raise

    def score(self, pairs: Sequence) -> list[tuple[float, float]]:
        import ray

        try:
            return ray.get(self.host.score.remote(pairs))
        except ray.exceptions.RayActorError as exc:
            log.error("the scoring engine in placement group %s died (%s); the scoring actor exits so that "
                      "Ray restarts it", self.group.id.hex(), exc)
            os._exit(1)


def release_placement_groups(group_prefix: str) -> None:
    """Remove the placement groups named `group_prefix-...`."""
    import ray

    for info in ray.util.placement_group_table().values():
        if info["name"].startswith(group_prefix + "-") and info["state"] != "REMOVED":
            ray.util.remove_placement_group(ray.util.get_placement_group(info["name"]))
