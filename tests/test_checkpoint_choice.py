"""Promise: a run resumes from its newest complete checkpoint, never from a half-written one and never
silently from step 0, also when Ray Train lost the newest report (a worker died with it still queued): Ray
holds only pointers, by step, and our COMPLETE-marked folders decide."""

import json

import pytest

from dpo import checkpoint as ckpt


def publish(root, step, keep=2):
    """What _save does around the shards: an emptied folder, the small states, COMPLETE last."""
    folder = ckpt.begin(str(root), step)
    ckpt.write_states(folder, scheduler_state={}, step=step, epoch=0, skipped_batches=0, total_steps=10)
    ckpt.finish(str(root), step, keep)


@pytest.fixture
def own(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 6):
        publish(root, step)
    half = ckpt.begin(str(root), 8)  # its shards were being written when the worker died: no COMPLETE
    ckpt.write_states(half, scheduler_state={}, step=8, epoch=0, skipped_batches=0, total_steps=10)
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
    assert sorted(p.name for p in (own / "step-00000008").iterdir()) == ["COMPLETE", "scheduler.pt", ckpt.STATE]
    assert sorted(p.name for p in own.iterdir()) == ["step-00000006", "step-00000008"]
    assert json.loads((own / "step-00000008" / ckpt.STATE).read_text()) == {"step": 8, "epoch": 0,
                                                                           "skipped_batches": 0, "total_steps": 10}


def test_ray_is_given_a_pointer_without_weights(tmp_path):
    ckpt.pointer(str(tmp_path), 12)
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.STATE]
    assert ckpt.read_state(str(tmp_path))["step"] == 12


def test_fresh_start_when_nothing_exists(tmp_path):
    assert ckpt.newest(str(tmp_path / "none")) is None



TRAINED_ON = {"train": {"tokenizer": "t1", "input_files": [{"name": "a.jsonl", "size": 10, "sha256": "aa"}],
                        "scorer": "hf/float32"},
              "eval": None}


def a_run_with_one_checkpoint(tmp_path, *overrides):
    """A train folder as dpo.launch.train leaves it after step 3: its config, its datasets' fingerprints, a
    complete checkpoint."""
    from dpo.config import load_config
    from dpo.launch import DATASETS_FILE

    train_dir = tmp_path / "train"
    (train_dir / "checkpoints" / "step-00000003").mkdir(parents=True)
    (train_dir / "checkpoints" / "step-00000003" / ckpt.COMPLETE).write_text("{}")
    load_config(None, [f"run.output_dir={tmp_path}", *overrides]).save(str(train_dir / "config.yaml"))
    (train_dir / DATASETS_FILE).write_text(json.dumps(TRAINED_ON))
    return train_dir


def test_resume_check_names_a_nested_key_and_takes_an_absent_one_as_its_default(tmp_path):
    """A run with one complete checkpoint. Resuming it with another model.lora.r is refused naming that key;
    a saved config.yaml from before model.lora and train.gradient_checkpointing existed (both absent) resumes
    under their defaults; gradient checkpointing may be turned on for the resumption."""
    import yaml

    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

    train_dir = a_run_with_one_checkpoint(tmp_path, "model.lora.enabled=true")
    with pytest.raises(UserError, match=r"another model\.lora\.r, and training resumes"):
        _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                                            "model.lora.r=8"]), str(train_dir), TRAINED_ON)
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", "model.lora.enabled=true",
                                        "train.gradient_checkpointing=true"]), str(train_dir), TRAINED_ON)

    old = load_config(None, [f"run.output_dir={tmp_path}"]).model_dump(mode="json")
    del old["model"]["lora"], old["train"]["gradient_checkpointing"]
    (train_dir / "config.yaml").write_text(yaml.safe_dump(old))
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path}"]), str(train_dir), TRAINED_ON)


@pytest.mark.parametrize("override", ["data.max_length=384", "data.truncation=keep_start", "data.eval_files=[e.jsonl]",
                                      "data.format=explicit", "reference.backend=vllm", "run.seed=1",
                                      "model.dtype=bfloat16", "train.length_group_batches=2", "train.layout=packed"])
def test_a_resume_that_would_compute_other_steps_is_refused_naming_the_key(tmp_path, override):
    """Every key that alters what a step computes, in any section (data.* and reference.* among them), is
    compared with the saved run's: each override here is refused, naming its key."""
    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

    train_dir = a_run_with_one_checkpoint(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(UserError, match=rf"another {key}\b.*set it back to resume"):
        _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", override]), str(train_dir), TRAINED_ON)


def test_keys_marked_resumable_may_change_on_resume(tmp_path):
    """The keys marked RESUMABLE in dpo.config change how a step runs, not what it computes: all of these at
    once resume (the fault injection's debug.* as a section; the scoring actors' settings; a moved folder)."""
    from dpo.config import load_config
    from dpo.launch import _check_resumable

    train_dir = a_run_with_one_checkpoint(tmp_path)
    _check_resumable(load_config(None, [
        f"run.output_dir={tmp_path / 'moved'}", "run.name=again", "run.stall_timeout_s=60", "data.shard_rows=10",
        "model.logits_chunk_size=8", "reference.num_actors=3", "reference.batch_tokens=64",
        "reference.max_restarts=0", "train.max_steps=9", "train.epochs=3", "train.checkpoint_every=2",
        "train.max_failures=0", "train.response_logits=off", "train.gradient_checkpointing=true",
        "train.report_to=[tensorboard]", "train.cpus_per_worker=2", "debug.fail_at_step=5"]),
        str(train_dir), TRAINED_ON)


def test_a_resume_on_another_number_of_workers_must_keep_the_global_batch(tmp_path):
    """A run of 2 workers x 8 pairs (train.global_batch_size unset: 16 pairs a step) resumes on 1 worker with
    train.global_batch_size=16, and a run saved with it set resumes with it unset where the keys make the
    same 16. Another global batch is refused naming train.global_batch_size, the two sizes and how to resume:
    1 worker with it unset (8 pairs a step), or an accumulation that doubles it (32)."""
    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

    train_dir = a_run_with_one_checkpoint(tmp_path, "train.num_workers=2", "train.batch_size=8")
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", "train.num_workers=1", "train.batch_size=8",
                                        "train.global_batch_size=16"]), str(train_dir), TRAINED_ON)
    for other, size in ((["train.num_workers=1"], 8), (["train.num_workers=2", "train.grad_accum=2"], 32)):
        with pytest.raises(UserError, match=rf"another train\.global_batch_size \(16 pairs a step, now {size}\), and "
                                            r"training resumes from them; set train\.global_batch_size to 16"):
            _check_resumable(load_config(None, [f"run.output_dir={tmp_path}", "train.batch_size=8", *other]),
                             str(train_dir), TRAINED_ON)

    set_train_dir = a_run_with_one_checkpoint(tmp_path / "set", "train.num_workers=1", "train.batch_size=8",
                                              "train.global_batch_size=16")
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path / 'set'}", "train.num_workers=2",
                                        "train.batch_size=8"]), str(set_train_dir), TRAINED_ON)


def test_an_elastic_run_resumes_by_its_largest_group_s_global_batch(tmp_path):
    """A range's default global batch is its largest group's: a run of a fixed 2 workers x 8 pairs (16 a step)
    resumes as [1, 2] (8 x 2 = 16); a saved [1, 2], read back from its config.yaml, refuses [1, 4] (8 x 4 = 32)."""
    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

    fixed = a_run_with_one_checkpoint(tmp_path / "fixed", "train.num_workers=2", "train.batch_size=8")
    _check_resumable(load_config(None, [f"run.output_dir={tmp_path / 'fixed'}", "train.num_workers=[1,2]",
                                        "train.batch_size=8"]), str(fixed), TRAINED_ON)
    elastic = a_run_with_one_checkpoint(tmp_path / "elastic", "train.num_workers=[1,2]", "train.batch_size=8")
    with pytest.raises(UserError, match=r"another train\.global_batch_size \(16 pairs a step, now 32\)"):
        _check_resumable(load_config(None, [f"run.output_dir={tmp_path / 'elastic'}", "train.num_workers=[1,4]",
                                            "train.batch_size=8"]), str(elastic), TRAINED_ON)


@pytest.mark.parametrize("packing, prefix_sharing, attention, layout", [
    ("on", "auto", None, "packed"), ("auto", "on", None, "shared_prompt"), ("off", "off", None, "padded"),
    ("auto", "off", None, "padded"), ("auto", "off", "flash_attention_2", "auto")])
def test_a_run_saved_before_train_layout_resumes_under_the_layout_its_two_switches_chose(
        tmp_path, packing, prefix_sharing, attention, layout):
    """A config.yaml saved when train.packing and train.prefix_sharing chose the layout resumes under the
    train.layout they amount to (dpo.config.layout_of_retired_switches), and under no other."""
    import yaml

    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

    common = [f"run.output_dir={tmp_path}", f"model.attn_implementation={attention or 'null'}"]
    train_dir = a_run_with_one_checkpoint(tmp_path, *common[1:])
    saved = yaml.safe_load((train_dir / "config.yaml").read_text())
    del saved["train"]["layout"]
    saved["train"].update(packing=packing, prefix_sharing=prefix_sharing)
    (train_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    _check_resumable(load_config(None, [*common, f"train.layout={layout}"]), str(train_dir), TRAINED_ON)
    for other in {"auto", "padded", "packed", "shared_prompt"} - {layout}:
        with pytest.raises(UserError, match=r"another train\.layout, and training resumes"):
            _check_resumable(load_config(None, [*common, f"train.layout={other}"]), str(train_dir), TRAINED_ON)


@pytest.mark.parametrize("split, field, named", [
    ("train", "input_files", r"data\.train_files"), ("train", "scorer", r"reference\.backend"),
    ("train", "tokenizer", r"model\.tokenizer"), ("eval", "input_files", r"data\.eval_files")])
def test_a_resume_on_rescored_data_is_refused_by_its_fingerprint(tmp_path, split, field, named):
    """The config the same, the data not: an input file edited in place (same name, other content) and
    scored again, a re-scoring by another vLLM build, another tokenizer file. The datasets' fingerprints,
    recorded when the run started (train/datasets.json), differ from the ones training now reads: refused,
    naming what differs and the key behind it. The same fingerprints resume."""
    import copy

    from dpo.config import load_config
    from dpo.errors import UserError
    from dpo.launch import _check_resumable

    train_dir = a_run_with_one_checkpoint(tmp_path)
    cfg = load_config(None, [f"run.output_dir={tmp_path}"])
    _check_resumable(cfg, str(train_dir), copy.deepcopy(TRAINED_ON))
    now = copy.deepcopy(TRAINED_ON)
    if now[split] is None:
        now[split] = copy.deepcopy(now["train"])
    elif field == "input_files":
        now[split][field][0]["sha256"] = "bb"
    else:
        now[split][field] = "other"
    with pytest.raises(UserError, match=rf"trained on another {split} dataset \(.*{named}.*start over"):
        _check_resumable(cfg, str(train_dir), now)
