"""Promise: a precompute whose driver is killed outright (SIGKILL, no chance to clean up) and then rerun
gives exactly one row per kept pair, with the same scores as a clean run, and the rerun scores only
the shards the killed run had not finished.

With the hf backend only: what this proves (shard markers, the manifest written last, the resume that
skips committed shards: pipeline.stage and pipeline.manifest) does not depend on the backend, and each
run of it with vLLM's engine cost two engine starts (188 s on 2 cores). vLLM's engine dies and is
replaced mid-run in tests/test_vllm.py::test_two_actors_one_killed_mid_run_score_every_pair_once_as_hf_does."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpo import fingerprint as fpr
from dpo.config import load_config
from dpo.storage import read_parquet_files
from pipeline import manifest as mf
from pipeline.precompute import precompute

ROOT = Path(__file__).resolve().parents[1]
# 1000 pairs in 100 shards: the stream takes seconds, so the kill lands mid-run even when a loaded
# machine leaves the polling loop below asleep for a while (200 pairs once finished inside that time).
TRAIN = ROOT / "examples" / "data" / "train.jsonl"
SHARDS = 100
pytestmark = pytest.mark.slow


def write_config(path: Path, out: Path, model: str, backend: str) -> Path:
    path.write_text(yaml.safe_dump({
        "run": {"output_dir": str(out)},
        "data": {"train_files": [str(TRAIN)], "max_length": 64, "max_prompt_length": 32, "shard_rows": 10},
        "model": {"policy": model, "attn_implementation": "eager"},
        "reference": {"backend": backend, "pairs_per_call": 4, "batch_tokens": 256},
    }))
    return path


def reference_rows(out: Path) -> list[dict]:
    folder = str(out / "reference")
    return read_parquet_files(folder, fpr.read_manifest(folder)["files"]).to_pylist()


def run_job(config: Path, log: Path) -> subprocess.Popen:
    """The job as a driver of the session's Ray, as under `ray job submit` (RAY_ADDRESS): a Ray of its own
    would cost each run seconds to start. Ray ends a dead driver's actors with it."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "jobs.precompute_reference", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_driver_killed_mid_run_then_rerun(tmp_path, tiny_model, ray_session):
    out = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", out, tiny_model, "hf")
    markers = out / "reference" / mf.SHARDS

    job = run_job(config, tmp_path / "first.log")
    deadline = time.time() + 300
    while time.time() < deadline and len(list(markers.glob("*.json"))) < 3 and job.poll() is None:
        time.sleep(0.05)
    assert job.poll() is None, "the first run ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    done_before = {p.stem for p in markers.glob("*.json")}
    assert 3 <= len(done_before) < SHARDS
    assert not (out / "reference" / fpr.MANIFEST).exists(), "a killed run must not look complete"

    rerun = run_job(config, tmp_path / "second.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    manifest = fpr.read_manifest(str(out / "reference"))
    assert manifest["resumed_shards"] == len(done_before)
    assert manifest["written_shards"] == SHARDS - len(done_before)

    rows = reference_rows(out)
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)) == manifest["counts"]["kept"] == 1000

    # hf scores a sequence the same to the bit in any batch (eager attention).
    clean_cfg = load_config(str(config), [f"run.output_dir={tmp_path / 'clean'}"])
    precompute(clean_cfg)
    clean = {r["pair_id"]: (r["ref_chosen_logp"], r["ref_rejected_logp"]) for r in reference_rows(tmp_path / "clean")}
    assert all((r["ref_chosen_logp"], r["ref_rejected_logp"]) == clean[r["pair_id"]] for r in rows)
    assert json.loads((out / "reference" / "_progress.json").read_text())["fingerprint"] == manifest["fingerprint"]
