"""Promise: the pipeline job runs across Ray nodes. Scoring actors and training workers spread over two
nodes, outputs go to a path both share, a training worker killed on one node is replaced, and the result
equals the same job on one node.

The two nodes are this machine: `ray start --head --block` and `ray start --address=... --block` on
127.0.0.1, each with 2 CPUs, free ports and its own raylet and object store, run as child processes and
ended by the module's finalizer (never `ray stop`, which would stop every Ray on the machine). Where each
actor ran comes from Ray's own state API (`ray.util.state.list_actors`), not from our logs.
"""

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import copy_model
from test_cluster import BIN, ROOT, end_node, free_port, wait_for

pytestmark = pytest.mark.slow

# Two actors, two workers, 12 steps of the quickstart (8 pairs a worker), a checkpoint every 4, on the first
# 400 train pairs (TRAIN_PAIRS), scored in 8 calls of 50 pairs. No held-out set: the one pool that scores
# the train pairs would score it too (pipeline.stage), and it would add only time.
TRAIN_PAIRS = 400
JOB = ["--config", "configs/quickstart.yaml", "reference.num_actors=2",
       "data.shard_rows=50", "reference.pairs_per_call=50", "data.eval_files=[]",
       "train.num_workers=2", "train.max_steps=12", "train.log_every=1", "train.checkpoint_every=4",
       "train.max_failures=1"]


def _node(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    # Without a token: the suite's own ray.init() turns token auth on in this process's environment.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(home),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    gcs, dash = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray")
    head = _node([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                  f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={free_port()}",
                  f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                  "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}"], env, home / "head.log")
    nodes = [head]
    try:
        wait_for(dash, head)
        nodes.append(_node([str(BIN / "ray"), "start", "--block", f"--address=127.0.0.1:{gcs}",
                            "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--node-manager-port={free_port()}",
                            f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                            f"--runtime-env-agent-port={free_port()}"], env, home / "worker.log"))
        address = f"http://127.0.0.1:{dash}"
        from ray.util.state import list_nodes

        deadline = time.time() + 120
        while len([n for n in list_nodes(address=address) if n.state == "ALIVE"]) < 2:
            if time.time() > deadline or nodes[1].poll() is not None:
                raise RuntimeError("the second Ray node did not join: " + (home / "worker.log").read_text()[-2000:])
            time.sleep(1)
        yield {"address": address, "gcs": f"127.0.0.1:{gcs}", "env": env}
    finally:
        for proc in reversed(nodes):
            end_node(proc)


def _train_pairs(folder: Path) -> Path:
    path = folder / "train.jsonl"
    with open(ROOT / "examples" / "data" / "train.jsonl", encoding="utf-8") as src:
        path.write_text("".join(line for _, line in zip(range(TRAIN_PAIRS), src)), encoding="utf-8")
    return path


def _job(env: dict, out: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "jobs.pipeline", *JOB, f"model.policy={model}", f"run.output_dir={out}", *extra]
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _one_node(model: str, out: Path, train_pairs: Path) -> Path:
    """The same job's stages on one node: the suite's own Ray (this machine's 2 CPUs, in this process; the
    actors take half a CPU each), from the same config and model, without the failure."""
    from dpo.config import load_config
    from dpo.launch import train
    from jobs.train import find_datasets
    from pipeline.precompute import precompute

    cfg = load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        *(arg for arg in JOB if "=" in arg), f"model.policy={model}", f"run.output_dir={out}",
        f"data.train_files=[{train_pairs}]", "reference.cpus_per_actor=0.5"])
    precompute(cfg, "train")
    train(cfg, *find_datasets(cfg))
    return out


def _placed_actors(cluster: dict) -> list[list]:
    """[class name, placement group id, node id] of every actor the cluster placed, from Ray's state API.
    Asked from a process of the cluster's environment: this one's carries the suite's Ray token. An actor Ray
    Data asked for and never needed has no node (None) and is left out."""
    ask = ("import json, sys; from ray.util.state import list_actors; print(json.dumps([[a.class_name or '', "
           "a.placement_group_id, a.node_id] for a in list_actors(address=sys.argv[1], detail=True, limit=1000)]))")
    proc = subprocess.run([sys.executable, "-c", ask, cluster["address"]], env=cluster["env"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [actor for actor in json.loads(proc.stdout.strip().splitlines()[-1]) if actor[2]]


def _scores(out: Path) -> list[tuple]:
    from dpo import schema, storage
    from dpo.fingerprint import read_manifest

    folder = str(out / "reference")
    table = storage.read_parquet_files(folder, read_manifest(folder)["files"])
    return sorted(zip(*(table.column(c).to_pylist() for c in (schema.PAIR_ID, *schema.SCORE_COLUMNS))))


def test_the_pipeline_spreads_over_two_nodes_survives_a_worker_kill_and_equals_one_node(two_nodes, tmp_path,
                                                                                        quickstart_model,
                                                                                        ray_session):
    """Two nodes: 2 scoring actors (1 CPU each) and 2 training workers (train.placement_strategy=STRICT_SPREAD);
    the scoring pool and each worker group span both nodes;
    the rank-1 worker exits at step 9 (debug.fail_at_step) and Ray Train restarts the group from the step-8
    checkpoint. The same job on one node, without the failure, is the yardstick: the reference scores equal
    exactly (the same model and pairs, eager attention, whichever actor scored them), and every step's
    metrics within 1e-5; the run's own record says the restarted group resumed after step 8."""
    out = tmp_path / "run"
    model = copy_model(quickstart_model, tmp_path / "model")
    train_pairs = _train_pairs(tmp_path)
    proc = _job({**two_nodes["env"], "RAY_ADDRESS": two_nodes["gcs"]}, out, model, f"data.train_files=[{train_pairs}]",
                "train.placement_strategy=STRICT_SPREAD", "debug.fail_at_step=9")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / "train" / ".failed_at_step_9").exists()
    attempts = [json.loads(line) for line in (out / "train" / "attempts.jsonl").read_text().splitlines()]
    assert [(a["resumed_after_step"], a["workers"]) for a in attempts] == [(0, 2), (8, 2)]

    # The scoring pool on both nodes, by the dataset's own record of where its pairs were scored; each worker
    # group (the first attempt's and the restarted one) on both nodes.
    manifest = json.loads((out / "reference" / "_manifest.json").read_text())
    assert len(manifest["scored_on"]) == 2 and sum(manifest["scored_on"].values()) == manifest["counts"]["kept"], (
        manifest["scored_on"])
    assert len(manifest["scored_by"]) == 2, manifest["scored_by"]
    assert not (out / "reference_eval").exists()
    groups = collections.defaultdict(set)
    for name, group, node in _placed_actors(two_nodes):
        if "RayTrainWorker" in name:
            groups[group].add(node)
    assert len(groups) == 2 and all(len(nodes) == 2 for nodes in groups.values()), groups

    one_node = _one_node(model, tmp_path / "one-node", train_pairs)
    assert _scores(out) == _scores(one_node)
    got, want = _metrics(out), _metrics(one_node)
    assert [m["step"] for m in got] == [m["step"] for m in want] and len(got) >= 10
    for a, b in zip(got, want):
        for key, value in b.items():
            if key != "tokens_per_second" and isinstance(value, float):
                assert abs(a[key] - value) <= 1e-5 * max(1.0, abs(value)), (a["step"], key, a[key], value)
