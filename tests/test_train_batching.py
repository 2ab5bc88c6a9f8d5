"""The epoch plan and micro-batch slicing (the layouts of a micro-batch: tests/test_forward.py)."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from dpo.batching import Pairs, epoch_plan, micro_batch_seed, pairs_batch, rank_micro_batches


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
def test_without_global_batch_size_ranks_take_what_they_took_before(world, accum):
    """A global batch of batch_size x world x accum: rank r's a-th micro-batch is slice a x world + r of the
    batch, as before train.global_batch_size existed, each weighted world / 16, none a stand-in."""
    batch = np.arange(16) * 7
    per = 16 // (world * accum)
    for r in range(world):
        shares = rank_micro_batches(batch, per, r, world)
        assert [s.rows.tolist() for s in shares] == [batch[(a * world + r) * per:(a * world + r + 1) * per].tolist()
                                                     for a in range(accum)]
        assert [s.loss_weight for s in shares] == [world / 16] * accum


@pytest.mark.parametrize("size,micro,world", [(10, 3, 1), (10, 3, 2), (10, 3, 3), (10, 3, 4), (8, 4, 2), (5, 2, 2)])
def test_every_world_size_deals_the_same_micro_batches_and_runs_as_many_passes_on_each_rank(size, micro, world):
    """The global micro-batches are slices of `micro` pairs in order, the last one short, whatever the world
    size; micro-batch m goes to rank m % world; every rank runs as many passes as the most loaded one, the
    others' last being stand-ins of weight 0. E.g. 10 pairs, 3 a micro-batch, 3 ranks: micro-batches
    [0:3] [3:6] [6:9] [9:10]; rank 0 runs 0 and 3, ranks 1 and 2 run 1 and 2 and then a stand-in each."""
    batch = np.arange(size) + 100
    shares = [rank_micro_batches(batch, micro, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    counted = sorted((s.index, s.rows.tolist()) for rank in shares for s in rank if s.counted)
    assert counted == [(m, batch[m * micro:(m + 1) * micro].tolist()) for m in range(-(-size // micro))]
    assert all(s.index % world == r for r, rank in enumerate(shares) for s in rank)
    stand_ins = [s for rank in shares for s in rank if not s.counted]
    assert len(stand_ins) == len(shares[0]) * world - len(counted)
    assert all(s.loss_weight == 0 and len(s.rows) == 1 for s in stand_ins)


def test_ten_pairs_three_a_micro_batch_on_three_ranks():
    """Written out: micro-batches [0:3] [3:6] [6:9] [9:10] dealt to ranks 0 1 2 0, so rank 0 runs two, ranks
    1 and 2 one and a stand-in each (indices 4 and 5, past the last micro-batch)."""
    batch = np.arange(10)
    plan = [[(s.index, s.rows.tolist(), s.counted) for s in rank_micro_batches(batch, 3, r, 3)] for r in range(3)]
    assert plan == [[(0, [0, 1, 2], True), (3, [9], True)],
                    [(1, [3, 4, 5], True), (4, [0], False)],
                    [(2, [6, 7, 8], True), (5, [0], False)]]


def reduced_gradient(losses_of, theta, batch, micro, world):
    """What DDP or FSDP leaves in every rank's .grad after a step: each rank backpropagates its passes'
    sum(per-pair losses) x loss_weight, accumulated, and the ranks' gradients are averaged."""
    per_rank = []
    for r in range(world):
        grad = torch.zeros_like(theta)
        for share in rank_micro_batches(batch, micro, r, world):
            (g,) = torch.autograd.grad(losses_of(torch.as_tensor(share.rows)).sum() * share.loss_weight, theta)
            grad += g
        per_rank.append(grad)
    return torch.stack(per_rank).mean(0)


def test_uneven_splits_give_the_mean_gradient_over_the_global_batch_by_hand():
    """Per-pair loss x_i * theta with x = 1, 2, 3, 4, 5: the mean over the global batch is 3 theta, its
    gradient 3. Two pairs a micro-batch on 2 ranks: micro-batches {1, 2} {3, 4} {5}, rank 0 runs the first and
    the third, rank 1 the second and a stand-in; each pass weighs world / 5 = 2/5. Rank 0's gradient is
    (1 + 2) x 2/5 + 5 x 2/5 = 16/5, rank 1's (3 + 4) x 2/5 + 0 = 14/5, their average (16/5 + 14/5) / 2 = 3.
    The mean per rank would give ((1 + 2 + 5)/3 + (3 + 4)/2) / 2 = 37/12, the mean per micro-batch
    (1.5 + 3.5 + 5) / 3 = 10/3."""
    theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    x = torch.arange(1.0, 6.0, dtype=torch.float64)
    for world in (1, 2, 3):
        assert float(reduced_gradient(lambda rows: x[rows] * theta, theta, np.arange(5), 2, world)) == \
            pytest.approx(3.0, abs=1e-15), world


@pytest.mark.parametrize("size,micro,world", [(8, 4, 1), (8, 4, 2), (8, 3, 2), (8, 3, 3), (7, 2, 4), (9, 4, 2)])
def test_any_split_gives_the_gradient_of_one_process_over_the_global_batch(size, micro, world):
    """A DPO-shaped per-pair loss, -log sigmoid(theta . x_i), on random pairs: every split's reduced gradient
    and summed loss are those of one process taking the mean over the whole global batch (float64)."""
    rng = np.random.default_rng(size * 100 + micro * 10 + world)
    x = torch.tensor(rng.normal(size=(size, 5)))
    theta = torch.tensor(rng.normal(size=5), requires_grad=True)
    losses_of = lambda rows: -torch.nn.functional.logsigmoid(x[rows] @ theta)  # noqa: E731
    batch = rng.permutation(size)
    (whole,) = torch.autograd.grad(losses_of(torch.as_tensor(batch)).mean(), theta)
    assert torch.allclose(reduced_gradient(losses_of, theta, batch, micro, world), whole, rtol=1e-12, atol=1e-14)


def test_a_micro_batch_draws_the_same_dropout_at_any_world_size():
    """Seeded from (seed, step, micro-batch index) and nothing of the rank: the dropout masks that each global
    micro-batch of a step draws are the same dealt over 1, 2 or 3 ranks. Another step, seed or micro-batch
    draws another mask."""
    def masks(world, step=5, seed=0):
        drawn = {}
        for r in range(world):
            for share in rank_micro_batches(np.arange(12), 4, r, world):
                if share.counted:
                    torch.manual_seed(micro_batch_seed(seed, step, share.index))
                    drawn[share.index] = torch.nn.functional.dropout(torch.ones(64), 0.5)
        return drawn

    one = masks(1)
    assert sorted(one) == [0, 1, 2]
    for world in (2, 3):
        other = masks(world)
        assert other.keys() == one.keys() and all(torch.equal(one[m], other[m]) for m in one)
    assert not torch.equal(one[0], one[1])
    assert not torch.equal(one[0], masks(1, step=6)[0]) and not torch.equal(one[0], masks(1, seed=1)[0])
