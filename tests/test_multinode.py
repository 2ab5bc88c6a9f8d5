"""Promise: the pipeline job runs across Ray nodes that share no directory, only a bucket. Scoring actors and
training workers spread over two nodes; the model, the pairs and every output live in the bucket alone (each
node copies the model into a cache of its own); an elastic worker group (train.num_workers: [1, 2]) goes on
with one worker when a node is lost with its worker; and the result equals the same job on one node from
local folders.

The two nodes are this machine: `ray start --head --block` and `ray start --address=... --block` on
127.0.0.1, each with 2 CPUs, free ports, its own raylet, object store and home folder (where the model's cache
goes), run as child processes and ended by the module's finalizer (never `ray stop`, which would stop every Ray
on the machine). The bucket is moto's S3 server (conftest.s3_server), which every process finds through the
AWS variables of the nodes' environment. Where each
actor ran comes from Ray's own state API (`ray.util.state.list_actors`), not from our logs.
"""

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_model, download_prefix, upload_folder
from dpo.checkpoint import complete_steps, read_metrics
from test_cluster import BIN, ROOT, end_node, free_port, wait_for

pytestmark = pytest.mark.slow

# Two actors, up to two workers, 48 steps of the quickstart (16 pairs), a checkpoint every 4, on the first 400
# train pairs (TRAIN_PAIRS), scored in 8 calls of 50 pairs. No held-out set: the one pool that scores the train
# pairs would score it too (pipeline.stage), and it would add only time. 48 steps: on idle cores a step takes
# about 0.1 s, and the steps after the kill must outlast the time the survivor takes to fail (with 12, and a
# kill that missed the lost node's worker, test_cluster.end_node's old one, the first group ended the run).
STEPS = 48
TRAIN_PAIRS = 400
JOB = ["--config", "configs/quickstart.yaml", "reference.num_actors=2",
       "data.shard_rows=50", "reference.pairs_per_call=50", "data.eval_files=[]", "train.global_batch_size=16",
       f"train.max_steps={STEPS}", "train.log_every=1", "train.checkpoint_every=4", "train.max_failures=1"]
# On two nodes the group is elastic, and a worker takes a node's 2 CPUs: Ray Train sizes the group by the CPUs
# the nodes hold, so one node holds one worker. Ray Train looks for room to grow every 2 s, and a group of 1
# waits before step GROW_BY (after the step-32 checkpoint) until it has grown: the returning node must find
# the run still going.
GROW_BY = 33
ELASTIC = ["train.num_workers=[1,2]", "train.cpus_per_worker=2", "train.elastic_resize_interval_s=2",
           f"debug.wait_for_full_group_at_step={GROW_BY}"]


def _node(cmd: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class TwoNodes:
    """A head node and a second node that a test may kill, with every process on it."""

    def __init__(self, home: Path, temp: str):
        self.home = home
        for node in ("head", "second"):
            (home / node).mkdir()
        # Without a token: the suite's own ray.init() turns token auth on in this process's environment. The
        # head's environment is the driver's too.
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(home / "head"),
                    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
        for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(name, None)
        self.gcs_port, dash = free_port(), free_port()
        self.address, self.gcs = f"http://127.0.0.1:{dash}", f"127.0.0.1:{self.gcs_port}"
        self.head = _node([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                           f"--port={self.gcs_port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
                           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                           f"--metrics-export-port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
                           f"--temp-dir={temp}"], self.env, home / "head.log")
        self.second: Optional[subprocess.Popen] = None
        wait_for(dash, self.head)

    def start_second(self) -> None:
        log = self.home / "worker.log"
        self.second = _node([str(BIN / "ray"), "start", "--block", f"--address={self.gcs}",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--node-manager-port={free_port()}",
                             f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
                             f"--runtime-env-agent-port={free_port()}"], {**self.env, "HOME": str(self.home / "second")},
                            log)
        from ray.util.state import list_nodes

        deadline = time.time() + 120
        while len([n for n in list_nodes(address=self.address) if n.state == "ALIVE"]) < 2:
            if time.time() > deadline or self.second.poll() is not None:
                raise RuntimeError("the second Ray node did not join: " + log.read_text()[-2000:])
            time.sleep(1)

    def kill_second(self) -> float:
        """Kill the second node and every process on it at once, as a lost machine goes; the time it died."""
        end_node(self.second)
        return time.time()

    def end(self) -> None:
        for proc in (self.second, self.head):
            if proc is not None:
                end_node(proc)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, s3_server, ray_temp):
    cluster = TwoNodes(tmp_path_factory.mktemp("home"), ray_temp)
    try:
        cluster.start_second()
        yield cluster
    finally:
        cluster.end()


def _train_pairs(folder: Path) -> Path:
    path = folder / "train.jsonl"
    with open(ROOT / "examples" / "data" / "train.jsonl", encoding="utf-8") as src:
        path.write_text("".join(line for _, line in zip(range(TRAIN_PAIRS), src)), encoding="utf-8")
    return path


def _job(env: dict, out: str, model: str, log: Path, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "jobs.pipeline", *JOB, f"model.policy={model}", f"run.output_dir={out}", *extra]
    return subprocess.Popen(args, env=env, cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen, done, what: str, timeout: float = 600) -> None:
    """Poll `done` until it holds; fail, naming `what`, if the job ends first or it takes longer."""
    deadline = time.time() + timeout
    while not done():
        assert proc.poll() is None and time.time() < deadline, f"the job ended or stalled before {what}"
        time.sleep(0.5)  # each look lists or reads the bucket: CPU of moto's and of this process


def _attempts(out: Path) -> list[dict]:
    return read_metrics(str(out / "train" / "attempts.jsonl"))


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
        f"data.train_files=[{train_pairs}]", "reference.cpus_per_actor=0.5", "train.num_workers=2"])
    precompute(cfg, "train")
    train(cfg, *find_datasets(cfg))
    return out


def _placed_actors(cluster: TwoNodes) -> list[list]:
    """[class name, placement group id, node id] of every actor the cluster placed, from Ray's state API.
    Asked from a process of the cluster's environment: this one's carries the suite's Ray token. An actor Ray
    Data asked for and never needed has no node (None) and is left out."""
    ask = ("import json, sys; from ray.util.state import list_actors; print(json.dumps([[a.class_name or '', "
           "a.placement_group_id, a.node_id] for a in list_actors(address=sys.argv[1], detail=True, limit=1000)]))")
    proc = subprocess.run([sys.executable, "-c", ask, cluster.address], env=cluster.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [actor for actor in json.loads(proc.stdout.strip().splitlines()[-1]) if actor[2]]


def _scores(out: Path) -> list[tuple]:
    from dpo import schema, storage
    from dpo.fingerprint import read_manifest

    folder = str(out / "reference")
    table = storage.read_parquet_files(folder, read_manifest(folder)["files"])
    return sorted(zip(*(table.column(c).to_pylist() for c in (schema.PAIR_ID, *schema.SCORE_COLUMNS))))


def test_the_pipeline_spreads_over_two_nodes_goes_on_without_a_lost_node_and_equals_one_node(
        two_nodes, tmp_path, quickstart_model, ray_session):
    """Two nodes: 2 scoring actors (1 CPU each) and an elastic group of 1 to 2 training workers (a node's 2 CPUs
    each); the scoring pool and the first group span both nodes. The job is given no path at all: model.policy,
    data.train_files and run.output_dir are in the bucket, and each node reads the model from a copy in its own
    home folder. Once the step-4 checkpoint is complete the second node is killed, its worker with it: the group
    goes on with 1 worker from that checkpoint. Then the node is started again, and the group grows back to 2
    workers from the newest checkpoint and ends the run. The same job on one node from local folders,
    with a fixed group of 2, is the yardstick: the reference scores equal exactly (the same model and pairs,
    eager attention, whichever actor scored them), and every step's metrics and the exported weights within
    1e-5, each step once in metrics.jsonl."""
    import boto3

    model = copy_model(quickstart_model, tmp_path / "model")
    train_pairs = _train_pairs(tmp_path)
    bucket = "raydpo-nodes"
    boto3.client("s3").create_bucket(Bucket=bucket)
    boto3.client("s3").upload_file(str(train_pairs), bucket, "data/train.jsonl")
    model_uri = upload_folder(model, bucket, "models/quickstart")
    proc = _job({**two_nodes.env, "RAY_ADDRESS": two_nodes.gcs}, f"s3://{bucket}/run", model_uri,
                tmp_path / "job.log", f"data.train_files=[s3://{bucket}/data/train.jsonl]", *ELASTIC)
    attempts_file = f"s3://{bucket}/run/train/attempts.jsonl"
    try:
        _wait(proc, lambda: 4 in complete_steps(f"s3://{bucket}/run/train/checkpoints"), "the step-4 checkpoint")
        killed = two_nodes.kill_second()
        _wait(proc, lambda: len(read_metrics(attempts_file)) == 2, "the group of 1")
        two_nodes.start_second()
        returned = time.time()
        proc.wait(timeout=900)
    finally:
        proc.kill()
    assert proc.returncode == 0, (tmp_path / "job.log").read_text()[-4000:]
    out = tmp_path / "run"
    download_prefix(bucket, "run", out)
    # Each node read the model from its own copy (~/.cache/raydpo/models), as a machine of its own would: one
    # whole copy each (and, where a tokenizing task or the driver came first, a copy of all but the weights).
    for node in ("head", "second"):
        copies = [p.name for p in (two_nodes.home / node / ".cache" / "raydpo" / "models").iterdir() if p.is_dir()]
        whole = [name for name in copies if not name.endswith("-no-weights")]
        assert len(whole) == 1 and whole[0].startswith("quickstart-"), (node, copies)
    attempts = _attempts(out)
    # From the newest checkpoint when Ray saw the node gone: step 4's, or a later one that the lost node's
    # worker helped to finish first; never the last, so the group of 1 trained. Grown back from the newest
    # checkpoint when Ray saw the node return: at the latest step 32's, where the group of 1 waits.
    assert [a["workers"] for a in attempts] == [2, 1, 2], attempts
    assert attempts[1]["resumed_after_step"] in range(4, GROW_BY, 4), attempts
    assert attempts[2]["resumed_after_step"] in range(attempts[1]["resumed_after_step"], GROW_BY, 4), attempts
    print(f"shrink: node killed -> 1 worker started {attempts[1]['started'] - killed:.1f} s; "
          f"grow: node back -> 2 workers started {attempts[2]['started'] - returned:.1f} s")

    # The scoring pool on both nodes, by the dataset's own record of where its pairs were scored.
    manifest = json.loads((out / "reference" / "_manifest.json").read_text())
    assert len(manifest["scored_on"]) == 2 and sum(manifest["scored_on"].values()) == manifest["counts"]["kept"], (
        manifest["scored_on"])
    assert len(manifest["scored_by"]) == 2, manifest["scored_by"]
    assert not (out / "reference_eval").exists()
    # By Ray's own record: each group of 2 on both nodes, the group of 1 on the head alone; the lost node's
    # worker was on the node Ray lists dead, and the grown group's on the node that returned.
    groups = collections.defaultdict(set)
    for name, group, node in _placed_actors(two_nodes):
        if "RayTrainWorker" in name:
            groups[group].add(node)
    assert sorted(len(nodes) for nodes in groups.values()) == [1, 2, 2], groups
    from ray.util.state import list_nodes

    dead = {node.node_id for node in list_nodes(address=two_nodes.address) if node.state == "DEAD"}
    (shrunk,) = (nodes for nodes in groups.values() if len(nodes) == 1)
    (first,) = (nodes for nodes in groups.values() if len(nodes) == 2 and nodes & dead)
    (grown,) = (nodes for nodes in groups.values() if len(nodes) == 2 and not nodes & dead)
    assert len(first & dead) == 1 and not shrunk & dead and shrunk < first and shrunk < grown, (groups, dead)

    one_node = _one_node(model, tmp_path / "one-node", train_pairs)
    assert _scores(out) == _scores(one_node)
    got, want = _metrics(out), _metrics(one_node)
    assert [m["step"] for m in got] == [m["step"] for m in want] == list(range(1, STEPS + 1))
    for a, b in zip(got, want):
        for key, value in b.items():
            if key != "tokens_per_second" and isinstance(value, float):
                assert abs(a[key] - value) <= 1e-5 * max(1.0, abs(value)), (a["step"], key, a[key], value)
    w, v = (load_file(str(run / "train" / "policy" / "model.safetensors")) for run in (out, one_node))
    assert set(w) == set(v) and all(torch.allclose(w[k], v[k], atol=1e-5, rtol=0) for k in w)
