"""Score every kept pair with the frozen reference model: the Ray Data actor pool.

    tokenized rows ─► ReferenceScorer (one per actor; hf or vllm backend) ─► + ref_chosen_logp, ref_rejected_logp

A score is log π_ref(response | prompt) summed over the response tokens (EOS
included). Both backends take token ids, never text, so what is scored is
exactly what training reads. Rows with a `reject` reason pass through with
null scores so the shard writer can still count them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
import warnings
from typing import Iterator, Optional, Sequence

import pyarrow as pa

from dpo import schema, storage
from dpo.config import Config
from dpo.errors import UserError
from dpo.model_folders import check_max_length, read_model_config
from dpo.job_cpus import refuse_unless_fits
from pipeline.placement import GroupHostedScorer, release_placement_groups
from pipeline.vllm_build import (INSTALL_CPU, INSTALL_CUDA, VLLMBuild, engine_environment, installed_vllm,
                                 require_vllm)

log = logging.getLogger(__name__)

FAIL_MARKER = "_debug_scoring_failed"
# Largest share of a scoring batch that may be padding (see pack_by_tokens).
MAX_PADDING = 0.1
# vLLM's own default of sequences per step for offline use on an H100-class GPU.
VLLM_MAX_SEQS = 1024

# (prompt token ids, response token ids)
PromptResponse = tuple[Sequence[int], Sequence[int]]
# (prompt, chosen, rejected) token ids of one pair
Triple = tuple[Sequence[int], Sequence[int], Sequence[int]]


# --------------------------------------------------------------------------- hf backend


def pack_by_tokens(lengths: Sequence[int], batch_tokens: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices grouped into batches whose padded size (longest × count) fits `batch_tokens`.

    Sorted by length, a batch also ends where the next sequence is more than
    `max_padding` shorter than the batch's longest: a large budget would
    otherwise pad a short sequence to the longest of hundreds, and padding costs
    as much as real tokens. Longest first, so an out-of-memory shows up in the
    first batch rather than hours in. A sequence longer than the budget still
    gets a batch of its own: it cannot be split.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else 0  # sorted descending: the first is the longest
        if current and (longest * (len(current) + 1) > batch_tokens or lengths[i] < (1 - max_padding) * longest):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFScorer:
    """Reference log-probs with transformers, on CPU or one GPU.

    It runs dpo.forward's PolicyLogps, the training forward: one row per pair
    (the prompt computed once) where the attention takes the shared layout's
    mask (eager, sdpa, flex_attention), and the output head only at the
    positions that predict a response token.
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", batch_tokens: int = 16384,
                 trust_remote_code: bool = False, attn_implementation: Optional[str] = None,
                 device: Optional[str] = None, logits_chunk_size: int = 1024):
        import torch
        from transformers import AutoModelForCausalLM

        from dpo.forward import PolicyLogps, check_response_head

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if attn_implementation is None and self.device == "cpu":
            # On CPU eager attention scores a sequence bit-identically in any batch; SDPA
            # takes another kernel for a batch without padding (~1e-8 relative drift).
            # Sorted batches are barely padded, so eager's masked scores cost little.
            attn_implementation = "eager"
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        lm = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, **kwargs,
        ).to(self.device).eval()
        self.policy = PolicyLogps(lm, logits_chunk_size)
        check_response_head(self.policy, self.policy, self.device, contextlib.nullcontext())
        attention = str(getattr(lm.config, "_attn_implementation", "") or "")
        self.layout = "shared" if attention in ("eager", "sdpa", "flex_attention") else "padded"
        self.batch_tokens = batch_tokens
        # Padding positions are masked out of attention and never scored, so any id will do.
        self.pad_id = lm.config.pad_token_id or 0

    def score(self, pairs: Sequence[Triple]) -> list[tuple[float, float]]:
        """(chosen, rejected) summed log-probs of each pair's replies given its prompt, float64, in input order."""
        # The tokens a pair's row(s) take: one row of both replies, or two rows of one each.
        if self.layout == "shared":
            lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
        else:
            lengths = [2 * (len(p) + max(len(c), len(r))) for p, c, r in pairs]
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
        for batch in pack_by_tokens(lengths, self.batch_tokens):
            for i, value in zip(batch, self._forward([pairs[i] for i in batch])):
                out[i] = value
        return out

    def _forward(self, pairs: Sequence[Triple]) -> list[tuple[float, float]]:
        import torch

        from dpo.forward import lay_out

        with torch.inference_mode():
            totals = self.policy(lay_out(pairs, self.pad_id, self.layout).to(self.device)).double().tolist()
        return list(zip(totals[:len(pairs)], totals[len(pairs):]))


# --------------------------------------------------------------------------- vllm backend


def prompt_token_logprobs(prompt_logprobs, token_ids: Sequence[int], start: int) -> list[float]:
    """log p(token_ids[i] | token_ids[:i]) for i >= start, read off vLLM's prompt_logprobs.

    `prompt_logprobs` is what vLLM returns per request: either a list with None
    at position 0 and a {token_id: Logprob} dict at every later position, or a
    FlatLogprobs (parallel lists token_ids/logprobs indexed by start_indices and
    end_indices per position). A position's entries hold the prompt's own token
    plus, with prompt_logprobs=k > 0, the top k; the token is looked up by id
    rather than assumed to come first.
    """
    if len(prompt_logprobs) != len(token_ids):
        raise ValueError(f"vLLM returned {len(prompt_logprobs)} prompt log-probs for {len(token_ids)} tokens")
    schema.scored_tokens(start, len(token_ids) - start)  # position 0 has no log-prob: refuses an empty prompt
    out = []
    flat = hasattr(prompt_logprobs, "start_indices")
    for pos in range(start, len(token_ids)):
        token = token_ids[pos]
        if flat:
            span = range(prompt_logprobs.start_indices[pos], prompt_logprobs.end_indices[pos])
            found = [prompt_logprobs.logprobs[j] for j in span if prompt_logprobs.token_ids[j] == token]
            value = found[0] if found else None
        else:
            entry = prompt_logprobs[pos] or {}
            value = entry[token].logprob if token in entry else None
        if value is None:
            raise ValueError(f"vLLM gave no log-prob for token {token} at position {pos}")
        out.append(float(value))
    return out


def vllm_engine_args(cfg: Config, build: Optional[VLLMBuild] = None) -> dict:
    """Keyword arguments of `vllm.LLM` for scoring sequences of up to data.max_length tokens.

    vLLM refuses a prompt that fills max_model_len, since it must generate one
    token after it (vLLM 0.26, InputProcessor._validate_prompt_len): a pair
    truncated to exactly data.max_length would fail the job. Hence one position
    more. reference.batch_tokens bounds the tokens of one forward pass, as it
    does for the hf backend; vLLM needs at least as many as sequences per step.
    With tensor parallelism the ranks must run as Ray actors inside the
    scoring actor's placement group (see pipeline.placement): vLLM picks that
    backend itself only when it sees enough GPUs, so it is named here.
    On vLLM's CPU build (`build`, default: the one installed here) the KV cache
    has the size reference.cpu_kv_cache_gib: otherwise the engine would take
    gpu_memory_utilization of the node's RAM.
    """
    ref = cfg.reference
    build = build or installed_vllm()
    cpu = {"kv_cache_memory_bytes": cpu_kv_cache_bytes(ref)} if build is not None and build.cpu else {}
    return dict(
        model=cfg.model.reference_path, skip_tokenizer_init=True, enable_prefix_caching=False,
        dtype=cfg.model.dtype, tensor_parallel_size=ref.tensor_parallel_size,
        gpu_memory_utilization=ref.gpu_memory_utilization, max_model_len=cfg.data.max_length + 1,
        max_num_batched_tokens=ref.batch_tokens, max_num_seqs=min(VLLM_MAX_SEQS, ref.batch_tokens),
        trust_remote_code=cfg.model.trust_remote_code,
        distributed_executor_backend="ray" if ref.tensor_parallel_size > 1 else "uni", **cpu,
    )


def cpu_kv_cache_bytes(ref) -> int:
    return int(ref.cpu_kv_cache_gib * 2**30)


def vllm_scorer_args(cfg: Config, build: VLLMBuild) -> tuple[dict, dict]:
    """`VLLMScorer(*args)` for this config on `build`, as a scoring actor makes it."""
    return vllm_engine_args(cfg, build), engine_environment(cfg.reference, build)


class VLLMScorer:
    """Reference log-probs with vLLM's prompt_logprobs; scalars leave the actor, never logprob lists.

    `environment` (pipeline.vllm_build.engine_environment) is set before vLLM
    is imported: vLLM reads its log level at import, and its engine processes
    inherit the rest.
    """

    def __init__(self, engine_args: dict, environment: Optional[dict] = None):
        os.environ.update(environment or {})
        if "kv_cache_memory_bytes" in engine_args:
            # vLLM's CPU platform lets this legacy variable override the engine argument.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        # vLLM's own deprecation notices (torch.distributed.reduce_op, at import) are not the user's to act on.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")
        try:
            import vllm
        except ImportError as exc:
            raise UserError(f"reference.backend=vllm but vLLM cannot be imported on this node ({exc}); "
                            f"reinstall it ({INSTALL_CUDA} for GPUs, {INSTALL_CPU} for CPUs) or set "
                            "reference.backend=hf") from None
        # vLLM 0.32 warms up chat templating in every LLM and logs a traceback where, as here, it has no
        # tokenizer (skip_tokenizer_init): harmless when scoring token ids, alarming in the job's log.
        logging.getLogger("vllm.renderers.base").addFilter(
            lambda record: record.getMessage() != "Chat template warmup failed")
        self.llm = vllm.LLM(**engine_args)
        self.params = vllm.SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0, detokenize=False,
                                          flat_logprobs=True)

    def score(self, pairs: Sequence[Triple]) -> list[tuple[float, float]]:
        """(chosen, rejected) summed log-probs of each pair's replies given its prompt, in input order."""
        seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
        sums = [sum(values) for values in self.token_logprobs(seqs)]
        return list(zip(sums[:len(pairs)], sums[len(pairs):]))

    def close(self) -> None:
        """Stop the engine's processes now: left to the interpreter's exit, their shutdown can hang it."""
        self.llm.llm_engine.engine_core.shutdown()

    def token_logprobs(self, seqs: Sequence[PromptResponse]) -> list[list[float]]:
        """log p(token | every token before it) for each response token, in input order."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(p) + list(r)) for p, r in seqs]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        return [prompt_token_logprobs(o.prompt_logprobs, o.prompt_token_ids, len(p))
                for o, (p, _) in zip(outputs, seqs)]


# --------------------------------------------------------------------------- the actor


def _die_once(marker: str) -> None:
    """Fault injection: exit abruptly unless an earlier attempt already did (the marker says so)."""
    if storage.is_uri(marker):
        if storage.exists(marker):
            return
        storage.write_text(marker, "scoring actor killed by debug.fail_scoring_after_batches\n")
    else:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        try:
            # O_EXCL: of several actors reaching the count, exactly one dies.
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    log.warning("debug.fail_scoring_after_batches: scoring actor %d exits now", os.getpid())
    os._exit(1)


def _tensor_parallel(ref) -> bool:
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
            if _tensor_parallel(ref):
                self.scorer = GroupHostedScorer(VLLMScorer, args, gpus=ref.tensor_parallel_size,
                                                cpus=ref.cpus_per_actor, group_prefix=group_prefix)
            else:
                self.scorer = VLLMScorer(*args)
        else:
            self.scorer = HFScorer(
                cfg.model.reference_path, dtype=cfg.model.dtype, batch_tokens=ref.batch_tokens,
                trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation,
                logits_chunk_size=cfg.model.logits_chunk_size,
                device="cuda" if ref.gpus_per_actor > 0 else "cpu")
        import ray

        # Called outside Ray (a test, a notebook), the runtime context would start a Ray of its own.
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        self.fail_after = cfg.debug.fail_scoring_after_batches
        self.fail_marker = fail_marker
        self.batches = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_after is not None and self.batches >= self.fail_after:
            _die_once(self.fail_marker)
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
        return batch.append_column(schema.SCORED_ON, pa.array([self.node] * batch.num_rows, pa.string()))


# --------------------------------------------------------------------------- driver side


def check_reference_model(cfg: Config) -> None:
    """Fail on the driver, before any actor starts, when the reference model cannot load.

    Reads the config and the safetensors headers only: loading the weights here
    would cost the driver a model's worth of memory.
    """
    path = cfg.model.reference_path
    key = cfg.model.reference_key
    hf_config = read_model_config(path, key, cfg.model.trust_remote_code)
    weights = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not weights:
        raise UserError(f"{key}: {path} holds no *.safetensors weights; convert the checkpoint with "
                        "save_pretrained(..., safe_serialization=True)")
    from safetensors import safe_open

    for name in weights:
        try:
            with safe_open(os.path.join(path, name), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{key}: {os.path.join(path, name)} is not a readable safetensors file ({exc}); "
                            "re-save or re-download the model") from None
    ref = cfg.reference
    vllm = ref.backend == "vllm"
    check_max_length(hf_config, max_length=cfg.data.max_length, key=key, path=path, extra=1 if vllm else 0,
                     why=" (vLLM keeps a position for the one token it generates after the scored sequence)"
                     if vllm else "")
    check_pool_fits(cfg)
    if not vllm:
        return
    if require_vllm(ref).cpu:
        check_cpu_kv_cache(cfg, hf_config, key)
        return
    if _tensor_parallel(ref):  # a tensor-parallel actor's GPUs are its placement group
        return
    if ref.gpu_memory_utilization > ref.gpus_per_actor:
        # vLLM takes this fraction of the whole GPU: actors sharing one would each ask for it.
        raise UserError(f"reference.gpus_per_actor={ref.gpus_per_actor:g} puts several vLLM actors on one GPU, but "
                        f"each takes reference.gpu_memory_utilization={ref.gpu_memory_utilization:g} of its memory; "
                        f"set reference.gpu_memory_utilization to at most {ref.gpus_per_actor:g} (a little less "
                        "leaves room for CUDA's own use)")


def kv_bytes_per_token(hf_config, dtype: str) -> int:
    """Keys and values of every layer for one token: 2 x layers x kv heads x head dim x bytes per value."""
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)


def check_cpu_kv_cache(cfg: Config, hf_config, key: str) -> None:
    """Refuse a CPU KV cache that cannot hold one sequence: vLLM's engine would fail to start in every actor."""
    per_token = kv_bytes_per_token(hf_config, cfg.model.dtype)
    tokens = cfg.data.max_length + 1  # vLLM's max_model_len, see vllm_engine_args
    have = cpu_kv_cache_bytes(cfg.reference)
    if have < tokens * per_token:
        raise UserError(
            f"reference.cpu_kv_cache_gib={cfg.reference.cpu_kv_cache_gib:g} holds {have // per_token} tokens of "
            f"{key} ({per_token} bytes each in {cfg.model.dtype}), fewer than one sequence of data.max_length + 1 "
            f"= {tokens}; set reference.cpu_kv_cache_gib to at least {tokens * per_token / 2**30:.3g} (more lets "
            "vLLM score more sequences at once)")
    import ray

    nodes = [n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]] if ray.is_initialized() else []
    if nodes and have > max(nodes):
        raise UserError(f"reference.cpu_kv_cache_gib={cfg.reference.cpu_kv_cache_gib:g} is more memory than any node "
                        f"offers its tasks (at most {max(nodes) / 2**30:.1f} GiB); lower it")


# Ray Data gives each read and tokenize task one CPU (its default for map tasks).
TASK_CPUS = 1.0


def check_pool_fits(cfg: Config) -> None:
    """Refuse a pool that leaves no CPU for the read and tokenize tasks feeding it: they would never run.

    Counts the CPUs this job can use (dpo.job_cpus), not the cluster's total: under
    `ray job submit --entrypoint-num-cpus 1` on 2 CPUs the driver holds one and a
    1-CPU actor the other.
    """
    ref = cfg.reference
    refuse_unless_fits(ref.num_actors * ref.cpus_per_actor + TASK_CPUS,
                       f"the scoring pool (reference.num_actors={ref.num_actors} x reference.cpus_per_actor="
                       f"{ref.cpus_per_actor:g}) and its read/tokenize tasks ({TASK_CPUS:g} CPU each)",
                       lower="reference.num_actors or reference.cpus_per_actor (fractions such as 0.5 are fine)",
                       fixed=TASK_CPUS)


@contextlib.contextmanager
def actor_pool(cfg: Config, folder: str) -> Iterator[dict]:
    """Keyword arguments of `map_pool(ds, ReferenceScorer, ...)` for the length of one scoring stage.

    Tensor-parallel actors make placement groups that outlive them (see
    pipeline.placement): a job that scores twice (train, then eval, then
    trains: jobs.pipeline) would wait forever for the GPUs the first pool's
    groups still hold, so they are removed when the stage ends, however it ends.
    """
    import ray

    ref = cfg.reference
    grouped = _tensor_parallel(ref)
    prefix = f"raydpo-scoring-{uuid.uuid4().hex[:12]}"
    marker = storage.join(folder, FAIL_MARKER) if cfg.debug.fail_scoring_after_batches is not None else None
    try:
        yield dict(
            fn_constructor_kwargs={"cfg": cfg, "fail_marker": marker, "group_prefix": prefix,
                                   "engine": str(require_vllm(ref)) if ref.backend == "vllm" else None},
            compute=ray.data.ActorPoolStrategy(size=ref.num_actors),
            # A tensor-parallel actor only forwards batches: its CPUs and GPUs are its engine's group.
            num_cpus=0 if grouped else ref.cpus_per_actor,
            num_gpus=0 if grouped else ref.gpus_per_actor,
            batch_format="pyarrow",
            batch_size=ref.pairs_per_call,
            # Ray Data restarts a dead pool actor forever by default, so a deterministic
            # crash (an OOM on one batch) would loop. A bound makes the job fail with the
            # actor's cause: a task in flight is retried on the restarted actor, and fails
            # once the actor is dead for good.
            max_restarts=ref.max_restarts,
            max_task_retries=-1 if ref.max_restarts > 0 else 0,
        )
    finally:
        if grouped:
            release_placement_groups(prefix)


def map_pool(ds, cls, pool: dict):
    """`ds.map_batches(cls, **pool)`, `pool` from actor_pool, without a deprecation warning from Ray.

    Ray 2.60's map_batches has no named parameter for the actors' max_restarts and
    max_task_retries; it takes them only through **ray_remote_args or
    ray_remote_args_fn, both deprecated. map_batches_internal, the developer API
    that map_batches calls after its own checks (a batch_size of at least 1, which
    actor_pool always sets), takes them as they are; Ray's own batch-inference
    stages call it for the same reason.
    """
    return ds.map_batches_internal(cls, **pool)
