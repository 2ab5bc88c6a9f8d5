"""Promise: input files on an object store are read as local ones are, a run whose outputs go to the store
equals the same run on local disk (through a worker's death), and a store that cannot be used is one line
naming the key, before Ray starts.

The store is a real S3 API on loopback: moto's server (conftest.s3_server), found by the job only through
the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION),
as it would find MinIO or S3. The jobs run as processes of their own: their Ray, and its read tasks, take
the variables from them, as a job's runtime env gives them on a cluster.
"""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import download_prefix, upload_folder
from dpo import fingerprint as fpr
from dpo.config import load_config
from dpo.storage import read_parquet_files
from dpo.launch import train
from pipeline.precompute import precompute_splits
from pipeline.prepare import dataset_folder, find_datasets

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "data"
BUCKET = "raydpo-test"
pytestmark = pytest.mark.slow


def _lines(path: Path, start: int, stop: int) -> bytes:
    return "".join(path.read_text(encoding="utf-8").splitlines(keepends=True)[start:stop]).encode()


@pytest.fixture(scope="module")
def store(tmp_path_factory, s3_server):
    """A bucket holding 60 train pairs as data/a.jsonl (30) and data/b.jsonl.gz (30), 20 held-out pairs as
    data/eval.parquet, and the same files on local disk."""
    import boto3

    local = tmp_path_factory.mktemp("local-copy")
    files = {"data/a.jsonl": _lines(EXAMPLES / "train.jsonl", 0, 30),
             "data/b.jsonl.gz": gzip.compress(_lines(EXAMPLES / "train.jsonl", 30, 60))}
    eval_rows = [json.loads(line) for line in _lines(EXAMPLES / "eval.jsonl", 0, 20).decode().splitlines()]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(eval_rows), sink)
    files["data/eval.parquet"] = sink.getvalue().to_pybytes()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for key, body in files.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(body)
    return {"env": dict(os.environ), "local": local}


def _config_file(path: Path, overrides: list[str]) -> str:
    path.write_text(load_config(None, overrides).to_yaml())
    return str(path)


def _reference_rows(out: Path, split: str) -> list[dict]:
    folder = dataset_folder(load_config(None, [f"run.output_dir={out}"]), "reference", split)
    table = read_parquet_files(folder, fpr.read_manifest(folder)["files"])
    return sorted((r for r in table.to_pylist()), key=lambda r: r["pair_id"])


def _metrics(train_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# 60 train pairs, 8 a step (4 on each of 2 workers): 6 steps, a checkpoint every 2, the newest 2 kept.
TRAIN = ["train.num_workers=2", "train.batch_size=4", "train.cpus_per_worker=1", "train.max_steps=6",
         "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.log_every=1", "train.eval_every=3",
         "train.learning_rate=2e-3", "train.loss_type=sigmoid", "train.beta=0.1"]
RUN = "run"  # the store's run.output_dir: s3://BUCKET/run
CHECKPOINT_FILES = [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp", "scheduler.pt", "state.json"]


def test_a_pipeline_job_on_the_store_equals_the_same_job_on_disk(store, tiny_model, tmp_path, ray_session):
    """jobs.pipeline on s3:// inputs (a glob over .jsonl and .jsonl.gz, a Parquet file) keeps the same pairs,
    with the same ids and token ids, as the same files read from local disk; only the file names differ.

    Its run.output_dir is in the bucket too, and everything lands there: the reference datasets (shards,
    manifest, rejects.jsonl), the checkpoints (DCP's files from both ranks, COMPLETE; the oldest pruned),
    metrics.jsonl, report.png and policy/. A worker killed before step 6, after step 5 was logged, is restarted
    from the bucket's newest complete checkpoint (step 4), not from the step-6 folder that a try killed while
    writing it left without COMPLETE; step 5's line is logged once. The result is the uninterrupted run's on
    local disk: the same scores to the bit, every step's metrics within 1e-6, the same exported files and
    checkpoints, byte for byte, and the job's log, uploaded when the job ends. The local run goes on while the
    store's job runs: the two share nothing.

The store's job reads model.policy from the bucket too: the driver's checks copy all but the weights, one
whole copy in the node's cache serves the scoring actor and both workers, and the datasets' fingerprints are
the local run's."""
    import boto3

    common = [f"model.policy={tiny_model}", "data.max_length=64", "data.max_prompt_length=48", *TRAIN]
    model_uri = upload_folder(tiny_model, BUCKET, "models/tiny")
    node_cache = tmp_path / "node-cache"
    # What a try of a larger world killed while writing step 6 would leave: a shard, no .metadata, no COMPLETE.
    # Planted before the run starts: no start, fresh or restarted, may take it, and the final step 6 replaces it.
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{RUN}/train/checkpoints/step-00000006/__2_0.distcp",
                                  Body=b"cut off")
    config = _config_file(tmp_path / "s3.yaml", [*common, f"model.policy={model_uri}",
                                                  f"data.train_files=[s3://{BUCKET}/data/*.jsonl*]",
                                                  f"data.eval_files=[s3://{BUCKET}/data/eval.parquet]",
                                                  f"run.output_dir=s3://{BUCKET}/{RUN}", "debug.fail_at_step=6",
                                                  "train.max_failures=1"])
    job = subprocess.Popen([sys.executable, "-m", "jobs.pipeline", "--config", config], cwd=ROOT,
                           env={**store["env"], "RAYDPO_MODEL_CACHE": str(node_cache)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        local = store["local"] / "data"
        cfg = load_config(None, [*common, f"data.train_files=[{local / 'a.jsonl'},{local / 'b.jsonl.gz'}]",
                                 f"data.eval_files=[{local / 'eval.parquet'}]", f"run.output_dir={tmp_path / 'local'}"])
        precompute_splits(cfg, ["train", "eval"])
        train(cfg, *find_datasets(cfg))
        output, _ = job.communicate(timeout=600)
    finally:
        job.kill()
    assert job.returncode == 0, output[-3000:]
    out = tmp_path / "from-s3"
    download_prefix(BUCKET, RUN, out)

    for split, count in (("train", 60), ("eval", 20)):
        got, want = _reference_rows(out, split), _reference_rows(tmp_path / "local", split)
        assert len(got) == len(want) == count
        for a, b in zip(got, want):
            assert a["file"].startswith(f"s3://{BUCKET}/data/") and Path(a["file"]).name == Path(b["file"]).name
            # The reference scores among them, to the bit.
            assert {k: v for k, v in a.items() if k != "file"} == {k: v for k, v in b.items() if k != "file"}
        folder = out / Path(dataset_folder(cfg, "reference", split)).name
        assert {"_manifest.json", "rejects.jsonl"} <= {p.name for p in folder.iterdir()}
        # The model read from the bucket hashes as its local folder: the weights, the tokenizer, the template.
        local_fingerprint = fpr.read_manifest(dataset_folder(cfg, "reference", split))["fingerprint"]
        assert fpr.read_manifest(str(folder))["fingerprint"] == local_fingerprint
        assert local_fingerprint["reference_model"] and local_fingerprint["tokenizer"]
    # The driver's checks copied all but the weights; the scoring actor and both workers share one whole copy.
    copies = sorted(p for p in node_cache.iterdir() if p.is_dir())
    assert [p.name for p in copies] == [copies[0].name, copies[0].name + "-no-weights"], copies
    assert copies[0].name.startswith("tiny-") and _files(copies[0]) == _files(tiny_model)
    for copy in copies:
        assert output.count(f"{model_uri} copied into {copy} (") == 1, output[-3000:]

    train_dir, local_train = out / "train", tmp_path / "local" / "train"
    attempts = [json.loads(line) for line in (train_dir / "attempts.jsonl").read_text().splitlines()]
    assert [(a["resumed_after_step"], a["workers"]) for a in attempts] == [(0, 2), (4, 2)]
    for checkpoints in (train_dir / "checkpoints", local_train / "checkpoints"):
        assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004", "step-00000006"]
    for step in ("step-00000004", "step-00000006"):
        folder = train_dir / "checkpoints" / step
        assert sorted(p.name for p in folder.iterdir()) == CHECKPOINT_FILES
        for name in set(CHECKPOINT_FILES) - {".metadata"}:  # it names the folder written and a random save id
            assert (folder / name).read_bytes() == (local_train / "checkpoints" / step / name).read_bytes(), name
    got, want = _metrics(train_dir), _metrics(local_train)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(got, want):
        assert set(a) == set(b)
        for key in set(a) - {"tokens_per_second"}:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
    assert (train_dir / "report.png").read_bytes().startswith(b"\x89PNG")
    # The job's log, written locally while the job runs, is in the bucket once it ends, workers' lines included.
    logs = sorted((out / "logs").iterdir())
    assert len(logs) == 1 and logs[0].name.startswith("pipeline-"), logs
    log_text = logs[0].read_text()
    assert "resolved config" in log_text and f"output_dir: s3://{BUCKET}/{RUN}" in log_text
    assert "step 6/6 loss" in log_text and f"{model_uri} copied into {copies[0]}" in log_text
    policy = sorted(p.name for p in (train_dir / "policy").iterdir())
    assert "model.safetensors" in policy and policy == sorted(p.name for p in (local_train / "policy").iterdir())
    for name in policy:
        assert (train_dir / "policy" / name).read_bytes() == (local_train / "policy" / name).read_bytes(), name


@pytest.mark.parametrize("override, message", [
    ("data.train_files=[s3://no-such-bucket/data/a.jsonl]",
     "data.train_files: s3://no-such-bucket/data/a.jsonl: the bucket no-such-bucket does not exist at {endpoint}; "
     "create it, or fix the URI"),
    (f"data.train_files=[s3://{BUCKET}/data/*.csv]",
     f"data.train_files: the pattern s3://{BUCKET}/data/*.csv matches no file; check the path"),
    ("model.policy=s3://no-such-bucket/models/tiny",
     "model.policy: s3://no-such-bucket/models/tiny: the bucket no-such-bucket does not exist at {endpoint}; "
     "create it, or fix the URI"),
    ("data.train_files=[zz://bucket/a.jsonl]",
     "data.train_files: zz://bucket/a.jsonl: no filesystem serves zz:// (Unrecognized filesystem type in URI: "
     "zz://bucket/a.jsonl); use s3://, gs://, hdfs:// or a local path"),
    ("run.output_dir=gs://bucket/run",
     "run.output_dir: gs://bucket/run: checkpoints are written through fsspec, which needs a package for gs:// "
     "(Please install gcsfs to access Google Storage)"),
    ("endpoint=http://127.0.0.1:9",
     "data.train_files: s3://" + BUCKET + "/data/a.jsonl: nothing answers at http://127.0.0.1:9; check "
     "AWS_ENDPOINT_URL and that the store is up ("),
])
def test_a_store_that_cannot_be_used_is_one_line_before_ray_starts(store, tiny_model, tmp_path, monkeypatch,
                                                                   capsys, override, message):
    from jobs import cli, prepare

    ray_starts = []
    monkeypatch.setattr(cli, "init_ray", lambda *args: ray_starts.append(args))
    config = _config_file(tmp_path / "c.yaml", [f"model.policy={tiny_model}", f"run.output_dir={tmp_path / 'run'}",
                                                 f"data.train_files=[s3://{BUCKET}/data/a.jsonl]"])
    overrides = [override]
    if override.startswith("endpoint="):
        monkeypatch.setenv("AWS_ENDPOINT_URL", override.removeprefix("endpoint="))
        overrides = []
    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--config", config, *overrides])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: " + message.format(endpoint=store["env"]["AWS_ENDPOINT_URL"])), err
    assert not ray_starts


def test_a_file_uri_is_an_input_as_its_path_is(tmp_path):
    """file:// has folders from its root, no buckets: the bucket check passes it by (it once read the empty
    name before the first slash as a bucket, and refused every file:// input)."""
    from pipeline.read import expand_inputs

    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}) + "\n")
    assert expand_inputs([f"file://{path}"]) == [f"file://{path}"]


def _files(folder) -> dict[str, bytes]:
    root = Path(folder)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_model_in_the_bucket_is_copied_once_per_node_and_hashed_as_its_folder(store, tiny_model, tmp_path,
                                                                                monkeypatch, capsys):
    """model.policy=s3://.../models/unit: the first reader on a node copies the folder into the node's cache
    (RAYDPO_MODEL_CACHE), byte for byte; the next ones get the same folder without a byte read again. The
    fingerprint's hashes are the local folder's, so a dataset scored from either is the same dataset.

    What needs no weights (the driver's checks, the config, the tokenizer) copies all but the weight files,
    and the weights' hash and the safetensors header check read the objects in the store: a driver on a node
    that trains nothing never stores the weights. Once the whole copy is there, it serves those readers too.

    An object replaced in the bucket changes its size or time, so the next reader gets a new copy holding the
    new bytes, never the stale one. A download cut off midway (a `.part` folder left by a killed process) is
    neither served nor kept. A prefix holding nothing is one line naming the key."""
    import boto3

    from dpo.errors import UserError
    from dpo.model_folders import check_model_folders, model_dir, read_model_config
    from pipeline.scoring_pool import check_reference_model
    from pipeline.tokenize import load_tokenizer

    cache = tmp_path / "node-cache"
    monkeypatch.setenv("RAYDPO_MODEL_CACHE", str(cache))
    uri = upload_folder(tiny_model, BUCKET, "models/unit")
    cfg = load_config(None, [f"model.policy={uri}", "data.max_length=64", "data.max_prompt_length=48"])

    # The driver's checks and hashes: no weight file reaches the node.
    check_model_folders(cfg.model, policy=True, reference=True)
    check_reference_model(cfg)
    assert fpr.weights_hash(uri, "model.policy") == fpr.weights_hash(tiny_model, "model.policy")
    assert fpr.tokenizer_hashes(uri, "model.policy") == fpr.tokenizer_hashes(tiny_model, "model.policy")
    (light,) = (p for p in cache.iterdir() if p.is_dir())
    assert light.name.startswith("unit-") and light.name.endswith("-no-weights")
    assert _files(light) == {k: v for k, v in _files(tiny_model).items() if not k.endswith(".safetensors")}
    assert "model.safetensors" in _files(tiny_model)

    copy = model_dir(uri, "model.policy")
    assert Path(copy).parent == cache and copy + "-no-weights" == str(light)
    assert _files(copy) == _files(tiny_model)
    # Every reader goes through the one copy: transformers' config and tokenizer included.
    from_bucket, from_folder = (read_model_config(path, "model.policy").to_dict() for path in (uri, tiny_model))
    assert from_bucket.pop("_name_or_path") == copy
    assert from_bucket == {k: v for k, v in from_folder.items() if k != "_name_or_path"}
    assert load_tokenizer(uri, key="model.policy")("a b c").input_ids == \
        load_tokenizer(tiny_model, key="model.policy")("a b c").input_ids
    first = {name: os.stat(Path(copy) / name).st_ino for name in _files(copy)}
    assert model_dir(uri, "model.policy") == copy
    assert {name: os.stat(Path(copy) / name).st_ino for name in _files(copy)} == first
    names = [Path(copy).name, Path(copy).name + "-no-weights", Path(copy).name + "-no-weights.lock",
             Path(copy).name + ".lock"]
    assert sorted(p.name for p in cache.iterdir()) == names
    # A later job on the node, a process of its own, gets the same copy: nothing downloaded again.
    later = subprocess.run([sys.executable, "-c", "import sys; from dpo.model_folders import model_dir; "
                            "print(model_dir(sys.argv[1], 'model.policy'))", uri],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert later.returncode == 0 and later.stdout.strip() == copy, later.stderr[-2000:]
    assert {name: os.stat(Path(copy) / name).st_ino for name in _files(copy)} == first
    assert sorted(p.name for p in cache.iterdir()) == names

    # A killed download's leftover, beside a copy that is not there.
    os.rename(copy, copy + ".part")
    (Path(copy + ".part") / "model.safetensors").write_bytes(b"cut off")
    (Path(copy + ".part") / "model-00002-of-00002.safetensors").write_bytes(b"a file the bucket does not hold")
    assert model_dir(uri, "model.policy") == copy and _files(copy) == _files(tiny_model)
    assert not Path(copy + ".part").exists()

    config = json.loads((Path(tiny_model) / "config.json").read_text())
    boto3.client("s3").put_object(Bucket=BUCKET, Key="models/unit/config.json",
                                  Body=json.dumps({**config, "rms_norm_eps": 1e-3}).encode())
    renewed = model_dir(uri, "model.policy")
    assert renewed != copy and json.loads((Path(renewed) / "config.json").read_text())["rms_norm_eps"] == 1e-3
    assert _files(copy) == _files(tiny_model)  # the old copy is left to the readers that hold it

    with pytest.raises(UserError) as empty:
        model_dir(f"s3://{BUCKET}/models/none", "model.reference")
    assert str(empty.value) == (f"model.reference: s3://{BUCKET}/models/none holds no files; give the URI of a "
                                "folder holding a Hugging Face model (config.json, *.safetensors, tokenizer files)")
    # A weight file whose header is cut short, found by two ranged reads of the object, before any actor.
    s3 = boto3.client("s3")
    s3.put_object(Bucket=BUCKET, Key="models/corrupt/config.json", Body=json.dumps(config).encode())
    s3.put_object(Bucket=BUCKET, Key="models/corrupt/model.safetensors",
                  Body=b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(UserError) as corrupt:
        check_reference_model(load_config(None, [f"model.policy=s3://{BUCKET}/models/corrupt"]))
    assert str(corrupt.value) == (f"model.policy: s3://{BUCKET}/models/corrupt/model.safetensors is not a readable "
                                  "safetensors file (a header of 16 bytes in a file of 20); re-save or re-download "
                                  "the model")
