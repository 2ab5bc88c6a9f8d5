"""The epoch plan, micro-batch slicing, and padded vs packed log-probs."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from dpo.batching import IGNORE, Pairs, collate, epoch_plan, packing_supported, policy_logps, rank_micro_batches


def random_pairs(n=24, vocab=200, seed=0, scored=True):
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: [rng.integers(4, vocab, rng.integers(lo, hi)).astype(np.int32).tolist() for _ in range(n)]  # noqa: E731
    table = {"pair_id": [f"p{i:03d}" for i in rng.permutation(n)], "prompt_ids": ids(1, 12),
             "chosen_ids": ids(1, 9), "rejected_ids": ids(1, 9)}
    if scored:
        table["ref_chosen_logp"] = rng.normal(-20, 5, n)
        table["ref_rejected_logp"] = rng.normal(-20, 5, n)
    return pa.table(table)


def test_pairs_are_sorted_by_id_whatever_the_block_order():
    table = random_pairs()
    a = Pairs.from_tables([table.slice(0, 10), table.slice(10)])
    b = Pairs.from_tables([table.slice(10), table.slice(0, 10)])
    assert a.pair_ids == sorted(a.pair_ids) == b.pair_ids
    assert all(np.array_equal(x, y) for x, y in zip(a.chosen, b.chosen))
    assert np.array_equal(a.ref_rejected, b.ref_rejected)


def test_epoch_plan_is_seeded_complete_and_length_grouped():
    tokens = np.random.default_rng(1).integers(10, 500, 100)
    plan = epoch_plan(tokens, 8, 4, seed=3, epoch=0)
    assert plan.shape == (12, 8)                                  # 100 // 8 steps; the rest dropped
    assert len(np.unique(plan)) == 96
    assert np.array_equal(plan, epoch_plan(tokens, 8, 4, seed=3, epoch=0))
    assert not np.array_equal(plan, epoch_plan(tokens, 8, 4, seed=3, epoch=1))
    spread = np.mean([np.ptp(tokens[b]) for b in plan])
    unsorted = np.mean([np.ptp(tokens[b]) for b in epoch_plan(tokens, 8, 1, seed=3, epoch=0)])
    assert spread < unsorted                                      # pools of 4 batches beat pools of 1


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 2), (4, 1)])
def test_ranks_split_each_global_batch_exactly(world, accum):
    batch = np.arange(16) * 7
    parts = [mb for r in range(world) for mb in rank_micro_batches(batch, r, world, accum)]
    assert sorted(np.concatenate(parts)) == sorted(batch)
    assert {len(p) for p in parts} == {16 // (world * accum)}


def test_labels_mask_prompt_and_padding():
    pairs = Pairs.from_tables([random_pairs(4)])
    mb = collate(pairs, np.arange(4), pad_id=0, packed=False)
    assert mb.input_ids.shape[0] == 8
    for j, i in enumerate(list(range(4)) * 2):
        response = (pairs.chosen if j < 4 else pairs.rejected)[i]
        counted = mb.labels[j][mb.labels[j] != IGNORE].numpy()
        assert np.array_equal(counted, response)
        assert int(mb.attention_mask[j].sum()) == len(pairs.prompt[i]) + len(response)


@pytest.mark.parametrize("average", [False, True])
def test_packed_logps_equal_padded(tiny_model, average):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    pairs = Pairs.from_tables([random_pairs(6, vocab=model.config.vocab_size)])
    rows = np.arange(6)
    with torch.no_grad():
        padded = policy_logps(model, collate(pairs, rows, 0, packed=False), average=average)
        packed = policy_logps(model, collate(pairs, rows, 0, packed=True), average=average)
        assert packing_supported(model, pairs, 0)
    for a, b in zip(padded, packed):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
