"""Read, tokenize and score with the reference model into {run.output_dir}/reference/ (and reference_eval/)."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Optional

import ray

from dpo import fingerprint as fpr
from dpo.config import Config
from dpo.errors import UserError
from pipeline.prepare import parts_to_make
from pipeline.scoring import ReferenceScorer
from pipeline.scoring_pool import actor_pool, check_reference_model, map_pool
from pipeline.stage import Part, run_stage
from pipeline.tokenize import TOKENIZATION_VERSION, load_tokenizer
from pipeline.vllm_scorer import require_vllm

log = logging.getLogger(__name__)


def scorer_id(cfg: Config) -> str:
    """What turns the tokens into scores besides the weights: the backend, vLLM's build and version, the dtype.

    Part of the reference dataset's fingerprint, so that a rerun never mixes in
    or reuses scores made otherwise. Training, which does not score, leaves it
    out of the fingerprint it expects.
    """
    ref = cfg.reference
    engine = [str(require_vllm(ref))] if ref.backend == "vllm" else []
    return "/".join([ref.backend, *engine, cfg.model.dtype])


class _CpuHolder:
    def ready(self) -> bool:
        return True


@contextlib.contextmanager
def held_cpus(cpus: Optional[float]) -> Iterator[None]:
    """debug.hold_cpus_after_check: an actor holds `cpus` CPUs (once Ray placed it) until the block ends."""
    if cpus is None:
        yield
        return
    import ray

    holder = ray.remote(num_cpus=cpus)(_CpuHolder).remote()
    ray.get(holder.ready.remote(), timeout=120)
    log.warning("debug.hold_cpus_after_check: an actor now holds %g CPUs", cpus)
    try:
        yield
    finally:
        ray.kill(holder)


def precompute(cfg: Config, split: str = "train") -> dict:
    """One split's reference dataset, scored or reused: its manifest."""
    return precompute_splits(cfg, [split])[split]


def precompute_splits(cfg: Config, wanted: list[str]) -> dict[str, dict]:
    """The wanted splits' reference datasets, scored by one actor pool or reused: manifests by split."""
    # Fail here, not in a Ray task or actor, when the tokenizer or model cannot load.
    load_tokenizer(cfg.model.tokenizer_path, cfg.model.trust_remote_code, cfg.model.tokenizer_key)
    check_reference_model(cfg)
    ref = cfg.reference
    reused, parts = parts_to_make(
        cfg, "reference", wanted,
        lambda files: {**fpr.compute(cfg, files, with_reference=True, tokenization_version=TOKENIZATION_VERSION),
                       "scorer": scorer_id(cfg)},
        {"backend": ref.backend, "dtype": cfg.model.dtype, "reference_model": cfg.model.reference_path,
         "num_actors": ref.num_actors, "batch_tokens": ref.batch_tokens})
    made = _score(cfg, parts) if parts else {}
    return {split: reused.get(split) or made[split] for split in wanted}


def _score(cfg: Config, parts: list[Part]) -> dict[str, dict]:
    with held_cpus(cfg.debug.hold_cpus_after_check), actor_pool(cfg, parts[0].folder) as pool:
        try:
            return run_stage(cfg, parts, score=lambda ds: map_pool(ds, ReferenceScorer, pool))
        except ray.exceptions.RayActorError as exc:
            raise UserError(_actor_died(cfg, exc)) from exc


def _actor_died(cfg: Config, exc: BaseException) -> str:
    """One line for a scoring actor dead for good: it died once more than reference.max_restarts allows."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in lines if line.startswith("The actor is dead because")), lines[0] if lines else "")
    restarts = cfg.reference.max_restarts
    return (f"a scoring actor died {restarts + 1} time{'s' if restarts else ''}, once more than "
            f"reference.max_restarts={restarts} allows ({cause.rstrip('.')}); the job's log holds its output. If it "
            "ran out of memory, lower reference.batch_tokens or reference.pairs_per_call; for a crash that may pass, "
            "raise reference.max_restarts. The shards written so far are kept: the rerun scores the rest")
