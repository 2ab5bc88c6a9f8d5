"""Promise: a run resumes from its newest complete checkpoint, never from a half-written one and never
silently from step 0, also when Ray Train lost the newest report (a worker died with it still queued): Ray
holds only pointers, by step, and our COMPLETE-marked folders decide."""

import json

import pytest

from dpo import checkpoint as ckpt


def publish(root, step, keep=2):
    """What _save does around the shards: an emptied folder, the small states, COMPLETE last."""
    folder = ckpt.begin(str(root), step)
    ckpt.write_states(folder, scheduler_state={}, rng_states=[], step=step, epoch=0, skipped_batches=0,
                      total_steps=10)
    ckpt.finish(str(root), step, keep)


@pytest.fixture
def own(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 6):
        publish(root, step)
    half = ckpt.begin(str(root), 8)  # its shards were being written when the worker died: no COMPLETE
    ckpt.write_states(half, scheduler_state={}, rng_states=[], step=8, epoch=0, skipped_batches=0,
                      total_steps=10)
    return root


def test_lost_report_resumes_from_our_newest_complete_checkpoint(own):
    """Whatever Ray last heard of (step 4, or nothing): step 6, the newest complete one, not the half-written 8."""
    assert ckpt.complete_steps(str(own)) == [4, 6]
    assert ckpt.newest(str(own)) == ckpt.folder(str(own), 6)
    assert ckpt.read_state(ckpt.newest(str(own)))["step"] == 6


def test_a_retried_step_starts_from_an_empty_folder_and_pruning_keeps_the_newest(own):
    """The retry of step 8 empties what the dead try left; once complete, only steps 6 and 8 remain (keep 2)."""
    (own / "step-00000008" / "__1_0.distcp").write_bytes(b"a dead try's shard")
    publish(own, 8)
    assert sorted(p.name for p in (own / "step-00000008").iterdir()) == ["COMPLETE", "rng.pt", "scheduler.pt",
                                                                        ckpt.STATE]
    assert sorted(p.name for p in own.iterdir()) == ["step-00000006", "step-00000008"]
    assert json.loads((own / "step-00000008" / ckpt.STATE).read_text()) == {"step": 8, "epoch": 0,
                                                                           "skipped_batches": 0, "total_steps": 10}


def test_ray_is_given_a_pointer_without_weights(tmp_path):
    ckpt.pointer(str(tmp_path), 12)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.STATE]
    assert ckpt.read_state(str(tmp_path))["step"] == 12


def test_fresh_start_when_nothing_exists(tmp_path):
    assert ckpt.newest(str(tmp_path / "none")) is None



def test_resume_check_names_a_nested_key_and_takes_an_absent_one_as_its_default(tmp_path):
    """A run with one complete checkpoint. Resuming it with another model.lora.r is refused naming that key;
    a saved config.yaml from before model.lora and train.gradient_checkpointing existed (both absent) resumes
    under their defaults; gradient checkpointing may be turned on for the resumption."""
    import yaml

    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

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
