"""Promise: a precompute whose driver is killed outright (SIGKILL, no chance to clean up) and then rerun
gives exactly one row per kept pair, with the same scores as a clean run, and the rerun scores only
the shards the killed run had not finished.

Its run.output_dir is an object store's bucket (moto's S3 server on loopback, conftest.s3_server), the harder
case: no rename, markers and the manifest are objects, and a listing is what the resume reads. The clean run
writes to local disk, so the two also agree across the two kinds of storage. The resume on local disk is
tests/test_precompute.py::test_rerun_after_interruption_scores_only_unfinished_shards's.

With the hf backend only: what this proves (shard markers, the manifest written last, the resume that
skips committed shards: pipeline.stage and pipeline.manifest) does not depend on the backend, and each
run of it with vLLM's engine cost two engine starts (188 s on 2 cores). vLLM's engine dies and is
replaced mid-run in tests/test_vllm.py::test_a_vllm_actor_killed_mid_run_is_restarted_and_scores_every_pair_once_as_hf_does."""

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
from dpo import storage
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


BUCKET = "raydpo-driver-kill"


def reference_rows(out: str) -> list[dict]:
    folder = storage.join(out, "reference")
    return read_parquet_files(folder, fpr.read_manifest(folder)["files"]).to_pylist()


def committed_shards(out: str) -> set[str]:
    return {Path(name).stem for name in storage.list_files(storage.join(out, "reference", mf.SHARDS), ".json")}


def run_job(config: Path, log: Path) -> subprocess.Popen:
    """The job as a driver of the session's Ray, as under `ray job submit` (RAY_ADDRESS): a Ray of its own
    would cost each run seconds to start. Ray ends a dead driver's actors with it."""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return subprocess.Popen([sys.executable, "-m", "jobs.precompute_reference", "--config", str(config)],
                            cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def test_driver_killed_mid_run_then_rerun(tmp_path, tiny_model, ray_session, s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    out = f"s3://{BUCKET}/run"
    config = write_config(tmp_path / "c.yaml", out, tiny_model, "hf")

    job = run_job(config, tmp_path / "first.log")
    deadline = time.time() + 300
    while time.time() < deadline and len(committed_shards(out)) < 3 and job.poll() is None:
        time.sleep(0.25)  # each look lists the bucket: CPU of moto's and of this process, which the job needs
    assert job.poll() is None, "the first run ended before it could be killed:\n" + (tmp_path / "first.log").read_text()[-3000:]
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    done_before = committed_shards(out)
    assert 3 <= len(done_before) < SHARDS
    assert not storage.exists(storage.join(out, "reference", fpr.MANIFEST)), "a killed run must not look complete"

    rerun = run_job(config, tmp_path / "second.log")
    assert rerun.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    manifest = fpr.read_manifest(storage.join(out, "reference"))
    assert manifest["resumed_shards"] == len(done_before)
    assert manifest["written_shards"] == SHARDS - len(done_before)

    rows = reference_rows(out)
    ids = [r["pair_id"] for r in rows]
    assert len(ids) == len(set(ids)) == manifest["counts"]["kept"] == 1000

    # hf scores a sequence the same to the bit in any batch (eager attention).
    clean_cfg = load_config(str(config), [f"run.output_dir={tmp_path / 'clean'}"])
    precompute(clean_cfg)
    clean = {r["pair_id"]: (r["ref_chosen_logp"], r["ref_rejected_logp"])
             for r in reference_rows(str(tmp_path / "clean"))}
    assert all((r["ref_chosen_logp"], r["ref_rejected_logp"]) == clean[r["pair_id"]] for r in rows)
    progress = json.loads(storage.read_text(storage.join(out, "reference", "_progress.json")))
    assert progress["fingerprint"] == manifest["fingerprint"]
