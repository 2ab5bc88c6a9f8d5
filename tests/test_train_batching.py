"""The epoch plan and micro-batch slicing (the layouts of a micro-batch: tests/test_forward.py)."""

import numpy as np
import pyarrow as pa
import pytest

from dpo.batching import Pairs, epoch_plan, rank_micro_batches


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
