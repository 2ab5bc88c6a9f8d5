"""Promise: the quickstart runs unchanged under `ray job submit` on a real Ray cluster with token
authentication, and a submission without the cluster's token is refused.

The cluster is this machine alone: `ray start --head --block` on 127.0.0.1 with free ports, run as a
child process and ended by the test (never `ray stop`, which would stop every Ray on the machine).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def free_port(exclude=range(10002, 20000)) -> int:
    """A free TCP port outside Ray's worker port range."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in exclude:
            return port


def wait_for(url_port: int, proc, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited early with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", url_port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError("the Ray dashboard did not come up")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")  # no stray ~/.ray token reaches the client by accident
    token = secrets.token_hex(16)
    dash = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={free_port()}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           f"--metrics-export-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
           f"--temp-dir={tmp_path_factory.mktemp('ray')}"]
    log = open(home / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(dash, proc)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "home": home}
    finally:
        # --block ends the processes it started when it is stopped; the group kill covers stragglers.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    continue
        log.close()


def submit(cluster, env, args, timeout=900):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster["address"], "--working-dir", str(ROOT),
           "--runtime-env-json", json.dumps({"excludes": [".venv", "runs", ".git", "*.egg-info"]}),
           "--entrypoint-num-cpus", "0", "--", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_quickstart_job_succeeds_on_a_token_cluster(cluster, tmp_path):
    out = tmp_path / "run"
    proc = submit(cluster, cluster["env"], [
        "python", "-m", "jobs.pipeline", "--config", "configs/quickstart.yaml", "--build-model", "quickstart",
        f"run.output_dir={out}", f"model.policy={tmp_path / 'model'}", "train.max_steps=6",
        "train.eval_every=3", "train.checkpoint_every=3"])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", log).group(1)
    ask = ("import sys; from ray.job_submission import JobSubmissionClient; "
           "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    status = subprocess.run([sys.executable, "-c", ask, cluster["address"], job_id], env=cluster["env"],
                            capture_output=True, text=True, timeout=120)
    assert status.stdout.strip().splitlines()[-1] == "SUCCEEDED", status.stdout + status.stderr
    for path in ("reference/_manifest.json", "reference_eval/_manifest.json", "train/metrics.jsonl",
                 "train/report.png", "train/policy/config.json", "train/policy/model.safetensors"):
        assert (out / path).exists(), path
    steps = [json.loads(x)["step"] for x in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[-1] == 6


@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_submission_without_the_token_is_refused(cluster, credentials):
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    if credentials == "wrong":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    proc = submit(cluster, env, ["python", "-c", "print('should never run')"], timeout=120)
    assert proc.returncode != 0
    assert "should never run" not in proc.stdout
    expected = {"none": "missing authentication token", "wrong": "invalid authentication token"}[credentials]
    assert expected in (proc.stdout + proc.stderr).lower(), (proc.stdout + proc.stderr)[-2000:]


def test_ray_cli_is_on_path():
    assert shutil.which("ray", path=str(BIN)), "ray[default] must be installed for ray job submit"
