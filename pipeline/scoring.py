"""Score every kept pair with the frozen reference model: the Ray Data pool's actor.

    tokenized rows ─► ReferenceScorer (one per actor; hf or vllm backend) ─► + ref_chosen_logp, ref_rejected_logp

A score is log π_ref(response | prompt) summed over the response tokens (EOS
included). Both backends (pipeline.hf_scorer, pipeline.vllm_scorer) take token
ids, never text, so what is scored is exactly what training reads. Rows with a
`reject` reason pass through with null scores so the shard writer can still
count them. The driver's side, the checks before the pool starts and the pool's
arguments, is pipeline.scoring_pool.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import pyarrow as pa

from dpo import schema
from dpo.config import Config
from dpo.errors import UserError
from dpo.model_folders import model_dir
from pipeline.hf_scorer import HFScorer
from pipeline.placement import GroupHostedScorer
from pipeline.vllm_scorer import VLLMScorer, require_vllm, vllm_scorer_args

log = logging.getLogger(__name__)

FAIL_MARKER = "_debug_scoring_failed"


def _die_unless_done(marker: str, deaths: int) -> None:
    """Fault injection: exit abruptly, unless earlier attempts already died `deaths` times (their markers,
    `marker`, then `marker`.2, .3, ..., say so).

    The marker is a local file (scoring_pool.fail_marker refuses a URI): O_EXCL lets exactly one of several
    actors reaching the count create each marker and die.
    """
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    for death in range(1, deaths + 1):
        try:
            os.close(os.open(marker if death == 1 else f"{marker}.{death}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        log.warning("debug.fail_scoring_after_batches: scoring actor %d exits now (death %d of %d)", os.getpid(),
                    death, deaths)
        os._exit(1)


def tensor_parallel(ref) -> bool:
    """Whether each scoring actor runs a vLLM engine over several GPUs, in a placement group of its own."""
    return ref.backend == "vllm" and ref.tensor_parallel_size > 1


class ReferenceScorer:
    """Callable class for `map_batches`: pyarrow batch of tokenized rows in, the same rows plus scores out.

    Its constructor arguments come from `actor_pool`; `group_prefix` names the
    placement groups of tensor-parallel vLLM actors (pipeline.placement).
    """

    def __init__(self, cfg: Config, fail_marker: Optional[str] = None, group_prefix: Optional[str] = None,
                 engine: Optional[str] = None):
        ref = cfg.reference
        if ref.backend == "vllm":
            build = require_vllm(ref)
            if engine is not None and str(build) != engine:
                # The manifest names one engine for all scores; a node with another must not add its own.
                raise UserError(f"this node has {build} but the job scores with {engine}, as its driver has: "
                                "install the same vLLM on every node")
            args = vllm_scorer_args(cfg, build)
            if tensor_parallel(ref):
                self.scorer = GroupHostedScorer(VLLMScorer, args, gpus=ref.tensor_parallel_size,
                                                cpus=ref.cpus_per_actor, group_prefix=group_prefix)
            else:
                self.scorer = VLLMScorer(*args)
        else:
            self.scorer = HFScorer(
                model_dir(cfg.model.reference_path, cfg.model.reference_key), dtype=cfg.model.dtype,
                batch_tokens=ref.batch_tokens, trust_remote_code=cfg.model.trust_remote_code,
                attn_implementation=cfg.model.attn_implementation, logits_chunk_size=cfg.model.logits_chunk_size,
                device="cuda" if ref.gpus_per_actor > 0 else "cpu")
        import ray

        # Called outside Ray (a test, a notebook), the runtime context would start a Ray of its own.
        context = ray.get_runtime_context() if ray.is_initialized() else None
        self.where = {schema.SCORED_ON: context and context.get_node_id(),
                      schema.SCORED_BY: context and context.get_actor_id()}
        self.fail_after = cfg.debug.fail_scoring_after_batches
        self.deaths = cfg.debug.scoring_deaths
        self.fail_marker = fail_marker
        self.batches = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_after is not None and self.batches >= self.fail_after:
            _die_unless_done(self.fail_marker, self.deaths)
        kept = [i for i, r in enumerate(batch.column("reject").to_pylist()) if r is None]
        prompts = batch.column(schema.PROMPT_IDS).to_pylist()
        chosen = batch.column(schema.CHOSEN_IDS).to_pylist()
        rejected = batch.column(schema.REJECTED_IDS).to_pylist()
        pairs = [(prompts[i], chosen[i], rejected[i]) for i in kept]
        scores = self.scorer.score(pairs) if pairs else []
        ref_chosen: list[Optional[float]] = [None] * batch.num_rows
        ref_rejected: list[Optional[float]] = [None] * batch.num_rows
        for i, (chosen_logp, rejected_logp) in zip(kept, scores):
            ref_chosen[i], ref_rejected[i] = chosen_logp, rejected_logp
        self.batches += 1
        scored = {schema.REF_CHOSEN_LOGP: ref_chosen, schema.REF_REJECTED_LOGP: ref_rejected}
        for column in schema.SCORES:
            batch = batch.append_column(column, pa.array(scored[column.name], column.type))
        for column in schema.SCORED_WHERE:
            batch = batch.append_column(column, pa.array([self.where[column]] * batch.num_rows, pa.string()))
        return batch
