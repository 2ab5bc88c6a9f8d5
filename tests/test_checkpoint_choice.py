"""Promise: when Ray Train lost a checkpoint report that was still queued as a worker died, the run
resumes from the newest complete checkpoint of its own, never silently from step 0, and never from a
half-written one."""

import json

import pytest
from ray.train import Checkpoint

from dpo import checkpoint as ckpt


def make(folder, step):
    folder.mkdir(parents=True)
    (folder / ckpt.STATE).write_text(json.dumps({"step": step, "epoch": 0}))
    return folder


@pytest.fixture
def own(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 6):
        src = make(tmp_path / f"src-{step}", step)
        ckpt.publish(str(src), str(root), step, keep=2)
    make(root / "step-00000008", 8)  # copied, but its COMPLETE marker never landed
    return root


def chosen_step(ray_checkpoint, root):
    with ckpt.newest(ray_checkpoint, str(root)) as folder:
        return None if folder is None else ckpt.read_step(folder)


def test_lost_report_resumes_from_our_newest_complete_checkpoint(own):
    """Ray never heard of any checkpoint (its report was lost): step 6, the newest complete one."""
    assert ckpt.complete_steps(str(own)) == [4, 6]
    assert chosen_step(None, own) == 6


def test_ray_older_than_ours_loses(own, tmp_path):
    assert chosen_step(Checkpoint.from_directory(str(make(tmp_path / "ray4", 4))), own) == 6


def test_ray_newer_than_ours_wins(own, tmp_path):
    assert chosen_step(Checkpoint.from_directory(str(make(tmp_path / "ray10", 10))), own) == 10


def test_fresh_start_when_nothing_exists(tmp_path):
    assert chosen_step(None, tmp_path / "none") is None


def test_resume_check_names_a_nested_key_and_takes_an_absent_one_as_its_default(tmp_path):
    """A run with one complete checkpoint. Resuming it with another model.lora.r is refused naming that key;
    a saved config.yaml from before model.lora and train.gradient_checkpointing existed (both absent) resumes
    under their defaults; gradient checkpointing may be turned on for the resumption."""
    import yaml

    from dpo.config import UserError, load_config
    from dpo.trainer import _check_resumable

    train_dir = tmp_path / "train"
    (train_dir / "checkpoints" / "step-00000003").mkdir(parents=True)
    (train_dir / "checkpoints" / "step-00000003" / ckpt.COMPLETE).write_text("{}")
    saved = load_config(None, [f"run.output_dir={tmp_path}", "model.lora.enabled=true"])
    saved.save(str(train_dir / "config.yaml"))
    with pytest.raises(UserError, match=r"another model\.lora\.r, and training resumes"):
        _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                                            "model.lora.r=8"]), str(train_dir))
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                                        "train.gradient_checkpointing=true"]), str(train_dir))

    old = load_config(None, [f"run.output_dir={tmp_path}"]).model_dump(mode="json")
    del old["model"]["lora"], old["train"]["gradient_checkpointing"]
    (train_dir / "config.yaml").write_text(yaml.safe_dump(old))
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path}"]), str(train_dir))
