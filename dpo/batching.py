"""From token-id pairs to model inputs: the epoch plan and the micro-batches.

Determinism over streaming: every rank holds the whole (token ids only) dataset,
sorted by pair id, and builds the same seeded plan of global batches for an
epoch; rank r then takes its own slice of each global batch. Hence

- a resumed run continues exactly where it stopped: the plan of an epoch is a
  function of (seed, epoch) alone, and a step number names a global batch;
- 2 workers x batch b and 1 worker x batch 2b see the same global batches, so
  their gradients (the mean over the global batch) agree.

A micro-batch of b pairs runs through the model in one forward pass, in one
of dpo.forward's layouts: padded (2b rows), packed (one row; it saves work only
under flash attention's varlen kernels: sdpa and eager materialise a dense
[T, T] mask over the whole row, measured on CPU at 0.30 s packed vs 0.18 s
padded per step of 16 pairs) or shared (b rows, the prompt once per pair).
`choose_layout` resolves train.packing and train.prefix_sharing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import torch

from dpo.config import TrainConfig
from dpo.forward import Layout, ModelInputs, lay_out, sequence_logps

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


@dataclass
class Pairs:
    """A whole dataset of tokenized pairs, sorted by pair id."""

    pair_ids: list[str]
    prompt: list[np.ndarray]
    chosen: list[np.ndarray]
    rejected: list[np.ndarray]
    ref_chosen: Optional[np.ndarray]  # float64 [N]; None for a prepared (unscored) dataset
    ref_rejected: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def tokens(self) -> np.ndarray:
        """Tokens the pair puts through the model: both sequences, prompt counted twice."""
        return np.array([2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompt, self.chosen, self.rejected)])

    @classmethod
    def from_tables(cls, tables: Iterable[pa.Table]) -> "Pairs":
        table = pa.concat_tables(list(tables)) if not isinstance(tables, pa.Table) else tables
        table = table.sort_by("pair_id")  # the order of files and blocks must not matter
        scored = all(c in table.column_names for c in REF_COLUMNS)

        def ids(col: str) -> list[np.ndarray]:
            return [np.asarray(v, dtype=np.int64) for v in table.column(col).to_pylist()]

        return cls(
            pair_ids=table.column("pair_id").to_pylist(),
            prompt=ids("prompt_ids"),
            chosen=ids("chosen_ids"),
            rejected=ids("rejected_ids"),
            ref_chosen=table.column(REF_COLUMNS[0]).to_numpy().astype(np.float64) if scored else None,
            ref_rejected=table.column(REF_COLUMNS[1]).to_numpy().astype(np.float64) if scored else None,
        )


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


def rank_micro_batches(global_batch: np.ndarray, rank: int, world: int, grad_accum: int) -> list[np.ndarray]:
    """This rank's micro-batches of one global batch, one per accumulation step."""
    per = len(global_batch) // (world * grad_accum)
    return [global_batch[(a * world + rank) * per:(a * world + rank + 1) * per] for a in range(grad_accum)]


@dataclass
class MicroBatch:
    inputs: ModelInputs                   # what the model runs, in the chosen layout (dpo.forward)
    num_pairs: int
    chosen_lengths: torch.Tensor          # [b] response tokens
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
    return MicroBatch(
        inputs=lay_out(triples, pad_id, layout),
        num_pairs=len(rows),
        chosen_lengths=torch.tensor([len(c) for _, c, _ in triples], dtype=torch.float32),
        rejected_lengths=torch.tensor([len(r) for _, _, r in triples], dtype=torch.float32),
        ref_chosen=None if pairs.ref_chosen is None else torch.tensor(pairs.ref_chosen[rows], dtype=torch.float32),
        ref_rejected=None if pairs.ref_rejected is None else torch.tensor(pairs.ref_rejected[rows], dtype=torch.float32),
        pair_ids=[pairs.pair_ids[i] for i in rows],
        tokens=int(sum(2 * len(p) + len(c) + len(r) for p, c, r in triples)),
    )


def choose_layout(t: TrainConfig, model, lm, pairs: Pairs, pad_id: int, device, autocast) -> Layout:
    """train.packing and train.prefix_sharing, resolved on this model and device (`model` runs `lm`).

    packing: auto packs only under flash attention, and only if the model
    honours packed position ids. prefix_sharing: auto shares the prompt where
    it was measured to be faster (docs/benchmarks.md): on CPU, where eager and
    sdpa attention take its 4D mask. On GPU it stays off unless asked for
    (with flex_attention) until it is measured there.
    """
    attention = str(getattr(lm.config, "_attn_implementation", "") or "")
    if t.packing == "on" or (t.packing == "auto" and attention.startswith("flash")
                             and packing_supported(model, pairs, pad_id, device, autocast)):
        return "packed"
    if t.prefix_sharing == "on" or (t.prefix_sharing == "auto" and device.type == "cpu"
                                    and attention in ("eager", "sdpa")):
        return "shared"
    return "padded"


@torch.no_grad()
def packing_supported(model, pairs: Pairs, pad_id: int, device, autocast) -> bool:
    """Whether this model honours packed position_ids: packed and padded log-probs agree."""
    rows = np.arange(min(2, len(pairs)))
    with autocast:  # flash kernels take only half precision
        padded = sequence_logps(model, collate(pairs, rows, pad_id, "padded").inputs.to(device), average=False)
        packed = sequence_logps(model, collate(pairs, rows, pad_id, "packed").inputs.to(device), average=False)
    # Loose enough for bf16; a model that ignores the packing mixes whole sequences and misses by far more.
    return all(torch.allclose(a, b, atol=1e-2, rtol=1e-2) for a, b in zip(padded, packed))
