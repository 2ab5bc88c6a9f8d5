"""Guards that turn silent corruption into a clear refusal: non-finite reference scores at write and at
train time, and safe loading (safe YAML, no remote code unless asked, safetensors only)."""

import math

import pyarrow as pa
import pytest

from dpo.config import Config, UserError
from dpo.trainer import refuse_nonfinite_scores
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


def test_remote_code_is_off_unless_config_turns_it_on():
    assert Config().model.trust_remote_code is False


@pytest.mark.parametrize("max_length, refused", [(256, False), (300, True)])
def test_training_refuses_max_length_beyond_the_policys_positions(tiny_model, max_length, refused):
    """The tiny policy has 256 positions; training longer sequences would use positions it never learned."""
    from dpo.config import load_config
    from dpo.trainer import TrainData, validate

    cfg = load_config(None, [f"model.policy={tiny_model}", f"data.max_length={max_length}", "data.max_prompt_length=64",
                             "train.num_workers=1",
                             "train.batch_size=1"])
    data = TrainData(folder="prepared/", manifest={"counts": {"kept": 4}, "layout": {"scored": True}})
    if refused:
        with pytest.raises(UserError, match="model.policy: .* takes at most 256 positions .* needs data.max_length "
                                            "= 300 positions.*Lower data.max_length to 256"):
            validate(cfg, data)
    else:
        validate(cfg, data)
