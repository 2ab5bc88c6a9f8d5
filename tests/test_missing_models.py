"""A model, tokenizer or dataset folder that is not there: one line through each real entry point, naming the
key the user set and the fix, exit code 2, and no request to the model hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run_job(module: str, argv: list[str], capsys) -> str:
    """The job's one stderr line, after checking that it exited with code 2."""
    job = __import__(f"jobs.{module}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_:
        job.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def write_config(path: Path, tree: dict) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize("module", ["prepare", "precompute_reference", "pipeline", "train"])
def test_the_quickstart_without_its_model_names_build_model(module, tmp_path, monkeypatch, capsys):
    """configs/quickstart.yaml's model.policy is runs/quickstart/model, relative to the working directory;
    in an empty one it does not exist, and only --build-model makes it."""
    monkeypatch.chdir(tmp_path)
    line = run_job(module, ["--config", QUICKSTART], capsys)
    assert line.startswith("error: model.policy: runs/quickstart/model does not exist")
    assert "--build-model quickstart" in line
    assert "Repo id" not in line and "model.tokenizer" not in line


def test_the_quickstart_model_constant_is_the_quickstart_configs():
    from dpo.model_folders import QUICKSTART_MODEL

    assert yaml.safe_load(Path(QUICKSTART).read_text())["model"]["policy"] == QUICKSTART_MODEL


def test_a_bare_model_name_fails_at_once_without_the_hub(tmp_path, monkeypatch, capsys):
    """`nope` is not a folder; transformers would read it as a hub id and retry the hub for ~50 s. The job
    refuses it before anything opens a network connection (the hub's first step) and before Ray starts."""
    import socket

    from jobs import cli

    connections, ray_starts = [], []
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: connections.append(address))
    monkeypatch.setattr(cli, "init_ray", lambda *args: ray_starts.append(args))
    monkeypatch.chdir(tmp_path)
    line = run_job("prepare", ["--config", QUICKSTART, "model.policy=nope"], capsys)
    assert line == ("error: model.policy: nope is not a folder; give the path of a Hugging Face model folder "
                    "(models are read from local folders, never from the model hub)")
    assert connections == [] and ray_starts == []


def test_an_error_shows_the_log_file_and_one_line_and_the_file_holds_the_config(tmp_path, monkeypatch, capsys):
    """The terminal used to get 65 lines of resolved config before every error. Now stdout names the log file
    and stderr has the error; the file has both, and the config between them."""
    from jobs import prepare

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        prepare.main(["--config", QUICKSTART, "model.policy=nope"])
    captured = capsys.readouterr()
    (logs,) = (tmp_path / "runs" / "quickstart" / "logs").iterdir()
    assert logs.name.startswith("prepare-") and logs.suffix == ".log"
    assert [line.split(" ", 1)[1] for line in captured.out.splitlines()] == [
        f"INFO raydpo: prepare: the full log goes to runs/quickstart/logs/{logs.name}"]
    assert len(captured.err.splitlines()) == 1
    text = logs.read_text()
    assert "resolved config\nrun:\n  name: quickstart\n" in text
    assert text.rstrip().endswith("ERROR raydpo: error: model.policy: nope is not a folder; give the path of a "
                                  "Hugging Face model folder (models are read from local folders, never from the "
                                  "model hub)")


def test_a_missing_tokenizer_names_model_tokenizer(tiny_model, tmp_path, monkeypatch, capsys):
    """model.tokenizer was set, so it is the key to fix, although the policy folder is fine."""
    monkeypatch.chdir(tmp_path)
    line = run_job("precompute_reference", ["--config", QUICKSTART, f"model.policy={tiny_model}",
                                            "model.tokenizer=no/such"], capsys)
    assert line.startswith("error: model.tokenizer: no/such is not a folder; give the path of a Hugging Face")


def test_a_folder_without_a_tokenizer_is_refused_before_transformers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    line = run_job("prepare", ["--config", QUICKSTART, "model.policy=empty"], capsys)
    assert line == ("error: model.policy: empty holds no tokenizer files (tokenizer.json, ...); give a folder "
                    "holding a Hugging Face tokenizer")


def test_a_missing_reference_names_model_reference(tiny_model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = run_job("precompute_reference", ["--config", QUICKSTART, f"model.policy={tiny_model}",
                                            "model.reference=gone"], capsys)
    assert line.startswith("error: model.reference: gone is not a folder")


def train_config(tmp_path: Path, tiny_model: str) -> str:
    return write_config(tmp_path / "c.yaml", {
        "run": {"output_dir": str(tmp_path / "run")}, "model": {"policy": tiny_model},
        "data": {"train_files": [str(ROOT / "examples" / "data" / "eval.jsonl")], "max_length": 64,
                 "max_prompt_length": 32},
        "train": {"num_workers": 1}})


def test_train_on_a_fresh_output_dir_says_the_reference_does_not_exist(ray_session, tiny_model, tmp_path, capsys):
    line = run_job("train", ["--config", train_config(tmp_path, tiny_model)], capsys)
    assert line == (f"error: {tmp_path / 'run' / 'reference'} does not exist; jobs.precompute_reference "
                    "(or jobs.pipeline) makes it from this config")


def test_train_on_a_reference_free_loss_names_jobs_prepare(ray_session, tiny_model, tmp_path, capsys):
    line = run_job("train", ["--config", train_config(tmp_path, tiny_model), "train.loss_type=sft"], capsys)
    assert line == (f"error: {tmp_path / 'run' / 'prepared'} does not exist; jobs.prepare "
                    "(or jobs.pipeline) makes it from this config")


def test_train_on_an_unfinished_reference_says_it_was_never_finished(ray_session, tiny_model, tmp_path, capsys):
    (tmp_path / "run" / "reference").mkdir(parents=True)
    line = run_job("train", ["--config", train_config(tmp_path, tiny_model)], capsys)
    assert "has no _manifest.json: it was never finished" in line


def test_worker_lines_go_to_the_file_and_only_ours_and_rays_notices_to_the_terminal():
    """What Ray prints of its workers on the driver (sys.stdout and sys.stderr while a job runs): every line is
    filed, without Ray's colour codes; the terminal gets our marked lines (the mark taken off) and Ray's raylet and
    autoscaler notices."""
    import io
    import logging

    from dpo.worker_logs import TERMINAL_MARK
    from jobs.logs import WorkerLines

    filed = []
    handler = logging.Handler()
    handler.emit = lambda record: filed.append(record.getMessage())
    logger = logging.getLogger("workers")
    logger.addHandler(handler)
    try:
        terminal = io.StringIO()
        lines = WorkerLines(terminal)
        lines.write("\x1b[36m(RayTrainWorker pid=7)\x1b[0m Reporting training result 1\n(RayTrainWorker pid=7) ")
        lines.write(f"{TERMINAL_MARK}step 1/2 loss 0.69\n\x1b[33m(raylet)\x1b[0m a worker was killed\n")
        lines.write("(autoscaler +2s) No available node types can fulfill resource request\n(pid=9) tail")
        lines.flush()
    finally:
        logger.removeHandler(handler)
    assert filed == ["(RayTrainWorker pid=7) Reporting training result 1", "(RayTrainWorker pid=7) step 1/2 loss 0.69",
                     "(raylet) a worker was killed",
                     "(autoscaler +2s) No available node types can fulfill resource request", "(pid=9) tail"]
    assert terminal.getvalue().splitlines() == [
        "(RayTrainWorker pid=7) step 1/2 loss 0.69", "\x1b[33m(raylet)\x1b[0m a worker was killed",
        "(autoscaler +2s) No available node types can fulfill resource request"]
