"""Config: YAML + dotted overrides, validated, with errors that name the key."""

from pathlib import Path

import pytest

from dpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    cfg = load_config(str(ROOT / "configs" / name))
    assert cfg.run.name


def test_overrides_are_yaml_scalars_and_lists():
    cfg = load_config(None, ["train.num_workers=4", "data.train_files=[a.jsonl,b.parquet]", "train.use_gpu=true",
                             "train.learning_rate=1e-6", "model.reference=null", "run.name=x=y"])
    assert cfg.train.num_workers == 4 and cfg.train.use_gpu is True and cfg.train.learning_rate == 1e-6
    assert cfg.data.train_files == ["a.jsonl", "b.parquet"] and cfg.model.reference is None
    assert cfg.run.name == "x=y"


@pytest.mark.parametrize("overrides, message", [
    (["train.bogus=1"], "unknown config key 'train.bogus'; known keys in train:"),
    (["bogus.key=1"], "unknown config key 'bogus'"),
    (["train.num_workers=0"], "config key 'train.num_workers': input should be greater than or equal to 1"),
    (["train.beta=abc"], "config key 'train.beta': input should be a valid number"),
    (["data.max_prompt_length=600"], "data.max_prompt_length (600) must be smaller than data.max_length (512)"),
    (["train.loss_type=sigmod"], "train.loss_type: unknown loss type 'sigmod'; valid loss types are:"),
    (["train.loss_type=[sigmoid,sft]", "train.loss_weights=[1]"], "train.loss_weights has 1 entries"),
    (["train.num_workers"], "is not key=value"),
    (["train.num_workers.x=1"], "config key 'train.num_workers': input should be a valid integer"),
])
def test_mistakes_name_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass --config"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(str(bad))
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):  # safe_load refuses Python tags
        load_config(str(unsafe))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(str(ROOT / "configs" / "production.yaml"), ["train.num_workers=3"])
    cfg.save(str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")) == cfg
