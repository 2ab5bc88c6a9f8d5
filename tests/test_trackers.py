"""train.report_to's refusals, before Ray starts: a tracker that is not installed, or MLflow's default store
where it cannot go. What the trackers hold after a real run: tests/test_training.py (two_workers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def train_job_error(argv: list[str], capsys) -> str:
    """jobs.train's one stderr line, after checking that it exited with code 2."""
    from jobs import train

    with pytest.raises(SystemExit) as exit_:
        train.main(["--config", QUICKSTART, *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("tracker, absent", [("wandb", "wandb"), ("mlflow", "mlflow"), ("mlflow", "sqlalchemy")])
def test_a_tracker_that_is_not_installed_names_its_extra(tracker, absent, tiny_model, monkeypatch, capsys):
    """A None entry in sys.modules is how Python marks a module absent: `import` raises ImportError and
    importlib.util.find_spec returns None, as for a package never installed. SQLAlchemy stands for what
    MLflow's default SQLite store needs beyond the client."""
    monkeypatch.setitem(sys.modules, absent, None)
    line = train_job_error([f"model.policy={tiny_model}", f"train.report_to=[tensorboard,{tracker}]"], capsys)
    assert line == (f"error: train.report_to lists {tracker} but the {absent} package is not installed; "
                    f"install it with pip install 'raydpo[{tracker}]'")


def test_mlflow_without_a_tracking_uri_refuses_an_object_store_output(tiny_model, capsys, monkeypatch, s3_server):
    """MLflow's default store is a SQLite file in train/, which s3:// cannot hold. The bucket is real (moto's
    S3 server: a bucket that cannot be reached is refused before this check, tests/test_object_store.py), and
    the job's log goes there. (mlflow.set_tracking_uri, as an earlier test in the session may call it, exports
    MLFLOW_TRACKING_URI: unset it here.)"""
    import boto3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    boto3.client("s3").create_bucket(Bucket="raydpo-mlflow")
    line = train_job_error([f"model.policy={tiny_model}", "train.report_to=[mlflow]",
                            "run.output_dir=s3://raydpo-mlflow/run"], capsys)
    assert line == ("error: train.report_to lists mlflow and run.output_dir is an object-store URI "
                    "(s3://raydpo-mlflow/run/train), where MLflow's SQLite store cannot be written; set "
                    "MLFLOW_TRACKING_URI to a tracking server")
    listed = boto3.client("s3").list_objects_v2(Bucket="raydpo-mlflow", Prefix="run/logs/")["Contents"]
    assert [o["Key"] for o in listed if o["Key"].endswith(".log")] == [next(
        o["Key"] for o in listed if o["Key"].startswith("run/logs/train-"))]
