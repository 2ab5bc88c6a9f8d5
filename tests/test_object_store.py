"""Promise: input files on an object store are read as local ones are, and a store that cannot be used is
one line naming the key, before Ray starts.

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

from dpo import fingerprint as fpr
from dpo.config import load_config
from dpo.storage import read_parquet_files
from pipeline.prepare import dataset_folder, prepare_splits

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


def _prepared_rows(out: Path, split: str) -> list[dict]:
    folder = dataset_folder(load_config(None, [f"run.output_dir={out}"]), "prepared", split)
    table = read_parquet_files(folder, fpr.read_manifest(folder)["files"])
    return sorted((r for r in table.to_pylist()), key=lambda r: r["pair_id"])


def test_inputs_on_the_store_are_read_as_the_same_files_on_disk(store, tiny_model, tmp_path, ray_session):
    """jobs.prepare on s3:// inputs (a glob over .jsonl and .jsonl.gz, a Parquet file) keeps the same pairs,
    with the same ids and token ids, as the same files read from local disk; only the file names differ."""
    common = [f"model.policy={tiny_model}", "data.max_length=64", "data.max_prompt_length=48"]
    out = tmp_path / "from-s3"
    config = _config_file(tmp_path / "s3.yaml", [*common, f"data.train_files=[s3://{BUCKET}/data/*.jsonl*]",
                                                  f"data.eval_files=[s3://{BUCKET}/data/eval.parquet]",
                                                  f"run.output_dir={out}"])
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "--config", config],
        cwd=ROOT, env=store["env"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    local = store["local"] / "data"
    cfg = load_config(None, [*common, f"data.train_files=[{local / 'a.jsonl'},{local / 'b.jsonl.gz'}]",
                             f"data.eval_files=[{local / 'eval.parquet'}]", f"run.output_dir={tmp_path / 'local'}"])
    prepare_splits(cfg, ["train", "eval"])
    for split, count in (("train", 60), ("eval", 20)):
        got, want = _prepared_rows(out, split), _prepared_rows(tmp_path / "local", split)
        assert len(got) == len(want) == count
        for a, b in zip(got, want):
            assert a["file"].startswith(f"s3://{BUCKET}/data/") and Path(a["file"]).name == Path(b["file"]).name
            assert {k: v for k, v in a.items() if k != "file"} == {k: v for k, v in b.items() if k != "file"}


@pytest.mark.parametrize("override, message", [
    ("data.train_files=[s3://no-such-bucket/data/a.jsonl]",
     "data.train_files: s3://no-such-bucket/data/a.jsonl: the bucket no-such-bucket does not exist at {endpoint}; "
     "create it, or fix the URI"),
    (f"data.train_files=[s3://{BUCKET}/data/*.csv]",
     f"data.train_files: the pattern s3://{BUCKET}/data/*.csv matches no file; check the path"),
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
