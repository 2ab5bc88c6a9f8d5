"""From token-id pairs to model inputs: the epoch plan and the micro-batches.

Determinism over streaming: every rank sees the whole (token ids only) dataset,
sorted by pair id, and builds the same seeded plan of global batches for an
epoch from the pairs' lengths alone; each global batch is cut into the same
micro-batches at any world size, and rank r takes every world-th of them
(`rank_micro_batches`). Hence

- a resumed run continues exactly where it stopped: the plan of an epoch is a
  function of (seed, epoch) and the global batch's size alone, and a step
  number names a global batch;
- it may resume on another number of workers: a step's micro-batches, their
  dropout seeds (`micro_batch_seed`) and their weights in the gradient (the
  mean over the global batch) do not depend on which rank runs them;
- 2 workers x batch b and 1 worker x batch 2b see the same global batches, so
  their gradients agree.

Seeing is not copying: the dataset stays in Arrow's layout, each token column
one int32 buffer of every pair's ids end to end plus an offset and a size per
pair, put once in Ray's object store by the driver; the ranks of a node map
that one copy and read a pair's ids as a numpy view of it (see `Pairs`).

A micro-batch of b pairs runs through the model in one forward pass, in one
of dpo.forward's layouts: padded (2b rows), packed (one row; it saves work only
under flash attention's varlen kernels: sdpa and eager materialise a dense
[T, T] mask over the whole row, measured on CPU at 0.30 s packed vs 0.18 s
padded per step of 16 pairs) or shared_prompt (b rows, the prompt once per
pair): train.layout, its auto resolved by dpo.runtime.choose_layout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dpo import schema
from dpo.forward import Layout, ModelInputs, lay_out, sequence_logps


class TokenLists:
    """One column of token-id lists as Arrow lays out a list view: row i is
    values[offsets[i]:offsets[i] + sizes[i]], values being every row's ids end to end.

    All three are views of the Arrow buffers (read-only when those are the
    object store's shared memory): indexing returns an int32 view, copying nothing.
    """

    def __init__(self, array: pa.LargeListViewArray):
        self.offsets = array.offsets.to_numpy()
        self.sizes = array.sizes.to_numpy()
        self.values = array.values.to_numpy()

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i) -> np.ndarray:
        start = self.offsets[i]
        return self.values[start:start + self.sizes[i]]

    @property
    def lengths(self) -> np.ndarray:
        return self.sizes


class PairIds:
    """The pair_id column; ids[i] is a str, made on demand (a list of every id would cost ~60 bytes a pair)."""

    def __init__(self, array: pa.Array):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i) -> str:
        return self.array[int(i)].as_py()

    def __iter__(self):
        return iter(self.array.to_pylist())


@dataclass
class Pairs:
    """A whole dataset of tokenized pairs, sorted by pair id: views of the batch `pairs_batch` laid out."""

    pair_ids: PairIds
    prompt: TokenLists
    chosen: TokenLists
    rejected: TokenLists
    ref_chosen: Optional[np.ndarray]  # float64 [N]; None for a prepared (unscored) dataset
    ref_rejected: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.pair_ids)

    @functools.cached_property
    def tokens_per_pair(self) -> np.ndarray:
        """Tokens the pair puts through the model: both sequences, prompt counted twice."""
        return 2 * self.prompt.lengths + self.chosen.lengths + self.rejected.lengths

    @classmethod
    def from_batch(cls, batch: pa.RecordBatch) -> "Pairs":
        """Zero-copy views of a batch that `pairs_batch` laid out."""
        scored = all(c in batch.schema.names for c in schema.SCORE_COLUMNS)

        def scores(col: str) -> Optional[np.ndarray]:
            return batch.column(col).to_numpy(zero_copy_only=False) if scored else None

        return cls(
            pair_ids=PairIds(batch.column(schema.PAIR_ID)),
            prompt=TokenLists(batch.column(schema.PROMPT_IDS)),
            chosen=TokenLists(batch.column(schema.CHOSEN_IDS)),
            rejected=TokenLists(batch.column(schema.REJECTED_IDS)),
            ref_chosen=scores(schema.REF_CHOSEN_LOGP),
            ref_rejected=scores(schema.REF_REJECTED_LOGP),
        )

    @classmethod
    def from_tables(cls, tables: Union[pa.Table, Iterable[pa.Table]]) -> "Pairs":
        table = tables if isinstance(tables, pa.Table) else pa.concat_tables(list(tables))
        return cls.from_batch(pairs_batch(table.column, table.column_names))


def pairs_batch(read_column: Callable[[str], pa.ChunkedArray], names: Sequence[str]) -> pa.RecordBatch:
    """The columns `names` of a dataset in the layout `Pairs` views, sorted by pair id (the order of
    files and blocks must not matter): each column one array, token ids one int32 buffer.

    Sorting moves no token: a token column becomes a list view (an offset and a size per row into
    the values as read), and only those are put in pair-id order. `read_column` gives one column
    at a time, so a caller that lets go of each once handed over (dict.pop) holds one copy of the
    dataset plus the column in flight. Offsets are 64-bit: one column of a large dataset holds
    more than 2**31 tokens. A RecordBatch, not a Table: pyarrow pickles a batch's buffers out of
    band, which Ray's object store then hands to every reader zero-copy (Ray's own reducer for
    Tables does not take list views).
    """
    ids = read_column(schema.PAIR_ID)
    order = pc.sort_indices(ids)
    columns = {}
    for name in names:
        column = ids if name == schema.PAIR_ID else read_column(name)
        if pa.types.is_string(column.type):
            column = column.cast(pa.large_string()).combine_chunks()
        elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
            # A safe cast to int32: datasets written with int64 ids read too.
            lists = column.cast(pa.large_list(pa.int32())).combine_chunks()
            offsets = lists.offsets.to_numpy()
            column = pa.LargeListViewArray.from_arrays(offsets[:-1], np.diff(offsets), lists.values)
        else:
            column = column.combine_chunks()
        if name in schema.SCORE_COLUMNS:
            column = column.cast(schema.SCORES.field(name).type)
        columns[name] = column.take(order)
    return pa.RecordBatch.from_pydict(columns)


def epoch_plan(tokens: np.ndarray, global_batch: int, pool_batches: int, seed: int, epoch: int) -> np.ndarray:
    """Row indices of every global batch of an epoch: [steps, global_batch].

    Shuffle, then sort pools of `pool_batches` global batches by length and cut
    them, so a batch holds pairs of similar length (little padding) while the
    batches themselves come in shuffled order. The last incomplete global batch
    is dropped, as every rank must take the same number of steps.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(tokens))
    steps = len(order) // global_batch
    order = order[: steps * global_batch]
    pool = pool_batches * global_batch
    grouped = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        grouped.append(chunk[np.argsort(tokens[chunk], kind="stable")])
    batches = np.concatenate(grouped).reshape(steps, global_batch) if steps else np.zeros((0, global_batch), int)
    return batches[rng.permutation(steps)]


@dataclass(frozen=True)
class MicroBatchShare:
    """One forward and backward pass of a rank in a step."""

    index: int          # which global micro-batch: what seeds its random draws, whichever rank runs it
    rows: np.ndarray    # its pairs (a stand-in's: one pair, counted nowhere)
    loss_weight: float  # multiplies the sum of its per-pair losses; 0 for a stand-in

    @property
    def counted(self) -> bool:
        return self.loss_weight > 0


def rank_micro_batches(global_batch: np.ndarray, micro_batch_size: int, rank: int, world: int) -> list[MicroBatchShare]:
    """This rank's passes of one global batch: the one plan of how a step is split.

    The global batch is cut into global micro-batches of `micro_batch_size` pairs in order (the last one smaller
    where that does not divide), the same at any world size, and dealt to the ranks in turn: micro-batch m to
    rank m % world. A rank dealt fewer than the most loaded one ends with a stand-in of weight 0, so that every
    rank runs the same number of passes (FSDP gathers the weights in every one, and DDP's gradient sync in the
    last one waits for every rank's).

    Each pass's loss is sum(per-pair losses) x world / len(global_batch): DDP and FSDP average the ranks'
    gradients, so the step's gradient is sum over every pair / len(global_batch), the mean over the global batch
    however it is split, uneven micro-batches included (an average per micro-batch or per rank would weigh a
    pair of a small micro-batch more).
    """
    count = -(-len(global_batch) // micro_batch_size)
    passes = -(-count // world)
    shares = []
    for index in range(rank, passes * world, world):
        if index < count:
            rows = global_batch[index * micro_batch_size:(index + 1) * micro_batch_size]
            shares.append(MicroBatchShare(index, rows, world / len(global_batch)))
        else:
            # The step's first pair: a stand-in's loss times 0 is NaN only where that pair's own is, which makes
            # the step non-finite anyway.
            shares.append(MicroBatchShare(index, global_batch[:1], 0.0))
    return shares


def micro_batch_seed(seed: int, step: int, index: int) -> int:
    """The seed of the random draws (dropout, LoRA's dropout) of global micro-batch `index` of step `step`: a
    function of these alone, so a step draws the same at any world size and after any resume, and a checkpoint
    needs no RNG state."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


@dataclass
class MicroBatch:
    inputs: ModelInputs                   # what the model runs, in the chosen layout (dpo.forward)
    num_pairs: int
    chosen_lengths: torch.Tensor          # [b] scored response tokens (dpo.schema.scored_tokens)
    rejected_lengths: torch.Tensor
    ref_chosen: Optional[torch.Tensor]    # [b] float32
    ref_rejected: Optional[torch.Tensor]
    pair_ids: list[str]
    tokens: int                           # tokens of both sequences, prompt counted twice, in any layout

    def to(self, device) -> "MicroBatch":
        move = lambda t: t.to(device, non_blocking=True) if isinstance(t, (torch.Tensor, ModelInputs)) else t  # noqa: E731
        return MicroBatch(**{k: move(v) for k, v in self.__dict__.items()})


def collate(pairs: Pairs, rows: np.ndarray, pad_id: int, layout: Layout) -> MicroBatch:
    triples = [(pairs.prompt[i], pairs.chosen[i], pairs.rejected[i]) for i in rows]
    scored = lambda replies: schema.scored_tokens(pairs.prompt.lengths[rows], replies.lengths[rows])  # noqa: E731
    return MicroBatch(
        inputs=lay_out(triples, pad_id, layout),
        num_pairs=len(rows),
        chosen_lengths=torch.tensor(scored(pairs.chosen), dtype=torch.float32),
        rejected_lengths=torch.tensor(scored(pairs.rejected), dtype=torch.float32),
        ref_chosen=None if pairs.ref_chosen is None else torch.tensor(pairs.ref_chosen[rows], dtype=torch.float32),
        ref_rejected=None if pairs.ref_rejected is None else torch.tensor(pairs.ref_rejected[rows], dtype=torch.float32),
        pair_ids=[pairs.pair_ids[i] for i in rows],
        tokens=int(pairs.tokens_per_pair[rows].sum()),
    )


@torch.no_grad()
def packing_supported(model, pairs: Pairs, pad_id: int, device, autocast) -> bool:
    """Whether this model honours packed position_ids: packed and padded log-probs agree."""
    rows = np.arange(min(2, len(pairs)))
    with autocast:  # flash kernels take only half precision
        padded = sequence_logps(model, collate(pairs, rows, pad_id, "padded").inputs.to(device), average=False)
        packed = sequence_logps(model, collate(pairs, rows, pad_id, "packed").inputs.to(device), average=False)
    # Loose enough for bf16; a model that ignores the packing mixes whole sequences and misses by far more.
    return all(torch.allclose(a, b, atol=1e-2, rtol=1e-2) for a, b in zip(padded, packed))
