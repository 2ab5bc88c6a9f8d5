"""The epoch plan and micro-batch slicing (the layouts of a micro-batch: tests/test_forward.py)."""

import numpy as np
import pyarrow as pa
import pytest

from dpo.batching import Pairs, epoch_plan, pairs_batch, rank_micro_batches


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
    assert list(a.pair_ids) == sorted(a.pair_ids) == list(b.pair_ids)
    assert all(np.array_equal(x, y) for x, y in zip(a.chosen, b.chosen))
    assert np.array_equal(a.ref_rejected, b.ref_rejected)


def test_pairs_are_int32_views_and_sorting_moves_no_id():
    """Three pairs, ids out of order, ids as int64 lists (what the writer made before dpo.schema owned the types).
    Sorted by id: a (prompt [5, 6, 7], chosen [8], rejected [9, 10]), b ([11], [12, 13], [14]),
    c ([], [15], [16, 17, 18]). tokens = 2 x prompt + chosen + rejected: 2*3+1+2 = 9, 2*1+2+1 = 5, 0+1+3 = 4.
    Sorting moves no id: the prompt values stay as read (b's 11, c's nothing, a's 5 6 7), and in id order
    a starts at 1 with 3 ids, b at 0 with 1, c at 1 with 0."""
    pairs = Pairs.from_tables(pa.table({
        "pair_id": ["b", "c", "a"], "prompt_ids": [[11], [], [5, 6, 7]], "chosen_ids": [[12, 13], [15], [8]],
        "rejected_ids": [[14], [16, 17, 18], [9, 10]]}))
    assert list(pairs.pair_ids) == ["a", "b", "c"] and pairs.pair_ids[1] == "b" and len(pairs) == 3
    assert pairs.tokens_per_pair.tolist() == [9, 5, 4]
    assert pairs.prompt.values.tolist() == [11, 5, 6, 7]
    assert pairs.prompt.offsets.tolist() == [1, 0, 1] and pairs.prompt.sizes.tolist() == [3, 1, 0]
    assert [pairs.prompt[i].tolist() for i in range(3)] == [[5, 6, 7], [11], []]
    assert pairs.rejected[2].tolist() == [16, 17, 18]
    assert pairs.chosen[1].dtype == np.int32 and pairs.chosen.values.dtype == np.int32
    assert np.shares_memory(pairs.chosen[1], pairs.chosen.values)              # a view, not a copy
    assert pairs.ref_chosen is None                                             # a prepared (unscored) dataset


def test_ranks_map_the_object_stores_copy(ray_session):
    """The driver puts the laid-out table once; each get maps the same shared memory instead of copying
    it (a copy would be new memory each time), and the views read the same pairs as a local table."""
    import ray

    table = random_pairs(8)
    ref = ray.put(pairs_batch(table.column, table.column_names))
    first, second = Pairs.from_batch(ray.get(ref)), Pairs.from_batch(ray.get(ref))
    for column in ("prompt", "chosen", "rejected"):
        assert np.shares_memory(getattr(first, column).values, getattr(second, column).values), column
    local = Pairs.from_tables(table)
    assert all(np.array_equal(first.rejected[i], local.rejected[i]) for i in range(8))
    assert list(first.pair_ids) == list(local.pair_ids)
    assert np.array_equal(first.ref_chosen, local.ref_chosen)


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
