"""The forward pass DPO needs: log π(response | prompt) for both replies of each pair, and nothing more.

A batch of b pairs is laid out in one of three ways (`lay_out`; train.layout
chooses, dpo.runtime.choose_layout resolves its auto):

- padded: 2b right-padded rows, prompt+chosen then prompt+rejected;
- packed: the 2b sequences end to end in one row, position ids restarting at 0
  for each (transformers then masks it block-diagonally; only flash attention's
  varlen kernels turn that into less work);
- shared_prompt: b rows of prompt+chosen+rejected. The prompt is computed once
  per pair. The rejected reply's position ids restart at len(prompt), and the
  mask lets it see the prompt and itself, never the chosen reply, so each reply
  sees exactly what it would see alone. The layout carries each position's segment
  (prompt, chosen, rejected, padding); the forward turns that into the mask its
  attention takes: a dense 4D one for eager and sdpa, a FlexAttention BlockMask
  (no [T, T] tensor) for flex_attention.

Whatever the layout, `score_index` lists the flat positions of the [rows, T]
grid whose next token is a response token (`score_targets`), and
`score_sequence` says which of the 2b sequences it belongs to. Only there is
the output head applied: the model's body gives hidden states, the scored
positions are picked out, and head, log-softmax and gather run a chunk of
positions at a time (dpo.logprobs), so the [2b, T, V] logits tensor never
exists. A model whose causal-LM forward is more than head(body(x)) (logit
soft-capping or scaling) would score differently; `settle_response_head` finds
that out on the model itself, and such a model keeps the full-logits forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from dpo.logprobs import chunked_token_logps, gathered_token_logps
from dpo.schema import Triple, scored_tokens

log = logging.getLogger("raydpo.train")

Layout = Literal["padded", "packed", "shared_prompt"]
PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3  # the shared_prompt layout's segments


@dataclass
class ModelInputs:
    input_ids: torch.Tensor                 # [rows, T]
    attention_mask: Optional[torch.Tensor]  # padded: [rows, T]
    position_ids: Optional[torch.Tensor]    # packed and shared_prompt: [rows, T]
    segments: Optional[torch.Tensor]        # shared_prompt: [rows, T] int8, PROMPT, CHOSEN, REJECTED or PADDING
    score_index: torch.Tensor               # [N] flat positions of [rows, T] that predict a response token
    score_targets: torch.Tensor             # [N] the token each predicts
    score_sequence: torch.Tensor            # [N] its sequence: chosen of pair k is k, rejected is b + k
    num_pairs: int

    def to(self, device, non_blocking: bool = True) -> "ModelInputs":
        move = lambda t: t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t  # noqa: E731
        return ModelInputs(**{k: move(v) for k, v in self.__dict__.items()})


def _predictors(tokens_at: np.ndarray, before_first: int) -> np.ndarray:
    """Flat positions whose outputs predict a reply's tokens, which sit at `tokens_at`.

    Each token is predicted by the one before it in the sequence: the first by
    the prompt's last token (`before_first`; in the shared_prompt layout the chosen
    reply lies between them), every later one by its left neighbour.
    """
    return np.concatenate([[before_first], tokens_at[:-1]])


def lay_out(pairs: Sequence[Triple], pad_id: int, layout: Layout) -> ModelInputs:
    """The model inputs of `pairs` in `layout`; see the module docstring.

    A pair with an empty prompt is refused (dpo.schema.EmptyPrompt): every reply token is scored.
    """
    b = len(pairs)
    index, targets, sequence = [], [], []

    def score(seq: int, prompt_length: int, response, tokens_at: np.ndarray, before_first: int) -> None:
        targets.append(np.asarray(response, dtype=np.int64)[:scored_tokens(prompt_length, len(response))])
        index.append(_predictors(tokens_at, before_first))
        sequence.append(np.full(len(index[-1]), seq, dtype=np.int64))

    if layout == "shared_prompt":
        width = max(len(p) + len(c) + len(r) for p, c, r in pairs)
        segments = np.full((b, width), PADDING, dtype=np.int8)
        positions = np.zeros((b, width), dtype=np.int64)
        for k, (p, c, r) in enumerate(pairs):
            n, m, q = len(p), len(c), len(r)
            segments[k, :n], segments[k, n:n + m], segments[k, n + m:n + m + q] = PROMPT, CHOSEN, REJECTED
            positions[k, :n + m] = np.arange(n + m)
            positions[k, n + m:n + m + q] = n + np.arange(q)
            before = k * width + n - 1
            score(k, n, c, k * width + n + np.arange(m), before)
            score(b + k, n, r, k * width + n + m + np.arange(q), before)
        ids = _pad([np.concatenate([p, c, r]) for p, c, r in pairs], width, pad_id)
        return _inputs(ids, None, torch.from_numpy(positions), index, targets, sequence, b,
                       segments=torch.from_numpy(segments))

    sequences = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    if layout == "packed":
        offset = 0
        for j, (p, response) in enumerate(sequences):
            n, m = len(p), len(response)
            score(j, n, response, offset + n + np.arange(m), offset + n - 1)
            offset += n + m
        ids = torch.from_numpy(np.concatenate([np.concatenate([p, r]) for p, r in sequences]).astype(np.int64))
        positions = np.concatenate([np.arange(len(p) + len(r)) for p, r in sequences])
        return _inputs(ids[None], None, torch.from_numpy(positions)[None], index, targets, sequence, b)

    width = max(len(p) + len(r) for p, r in sequences)
    mask = torch.zeros((2 * b, width), dtype=torch.long)
    for j, (p, response) in enumerate(sequences):
        n, m = len(p), len(response)
        mask[j, :n + m] = 1
        score(j, n, response, j * width + n + np.arange(m), j * width + n - 1)
    ids = _pad([np.concatenate([p, r]) for p, r in sequences], width, pad_id)
    return _inputs(ids, mask, None, index, targets, sequence, b)


def _pad(rows: list[np.ndarray], width: int, pad_id: int) -> torch.Tensor:
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    for j, row in enumerate(rows):
        ids[j, :len(row)] = row
    return torch.from_numpy(ids)


def _inputs(ids, mask, positions, index, targets, sequence, b, segments=None) -> ModelInputs:
    cat = lambda parts: torch.from_numpy(np.concatenate(parts).astype(np.int64))  # noqa: E731
    return ModelInputs(ids, mask, positions, segments, cat(index), cat(targets), cat(sequence), b)


def response_head_parts(lm: torch.nn.Module) -> Optional[tuple[torch.nn.Module, torch.nn.Module]]:
    """(body, output head) of a transformers causal LM, or None where it does not expose them."""
    get_decoder = getattr(lm, "get_decoder", None)
    try:
        body = get_decoder() if callable(get_decoder) else getattr(lm, "model", None)
    except (AttributeError, NotImplementedError, ValueError):
        body = getattr(lm, "model", None)
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if body is None or body is lm or head is None:
        return None
    return body, head


class PolicyLogps(torch.nn.Module):
    """A causal LM as DPO runs it: `ModelInputs` in, the summed log-prob of each of the 2b sequences out.

    This is the module DDP and FSDP wrap, so that their forward hooks run
    around exactly this computation (FSDP gathers the head with the
    embeddings at the root). State dicts are taken of `lm`, the transformers
    model, whose keys stay those of a Hugging Face checkpoint.
    """

    def __init__(self, lm: torch.nn.Module, chunk_size: int, response_logits: bool = True):
        super().__init__()
        self.lm = lm
        self.chunk_size = chunk_size
        self.response_only = response_logits and response_head_parts(lm) is not None

    def forward(self, inputs: ModelInputs, full_logits: bool = False) -> torch.Tensor:
        """[2b] float64: sum over each sequence's response tokens of log p(token | every token before it).

        The per-token values are float32; their sum is taken in float64, which
        keeps a sum over thousands of tokens as exact as its terms.
        """
        mask = inputs.attention_mask if inputs.segments is None else shared_mask(inputs.segments, self.lm.config)
        model_inputs = dict(input_ids=inputs.input_ids, attention_mask=mask, position_ids=inputs.position_ids,
                            use_cache=False)
        if full_logits or not self.response_only:
            logits = self.lm(**model_inputs).logits
            logps = gathered_token_logps(logits, inputs.score_index, inputs.score_targets)
        else:
            body, head = response_head_parts(self.lm)
            hidden = body(**model_inputs)[0]
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, inputs.score_index)
            logps = chunked_token_logps(head, picked, inputs.score_targets, self.chunk_size)
        totals = torch.zeros(2 * inputs.num_pairs, dtype=torch.float64, device=logps.device)
        return totals.index_add(0, inputs.score_sequence, logps.double())


def may_attend(query_segment, key_segment, query, key):
    """The shared_prompt layout's rule, elementwise: may the token at `query` attend to the one at `key`?

    Causal, except that a rejected token never sees a chosen one, and a padding
    key is seen by nobody but itself (so that no query row is empty, which would
    give NaN). Works on broadcast tensors and as a FlexAttention mask_mod.
    """
    return ((key <= query) & ~((query_segment == REJECTED) & (key_segment == CHOSEN))
            & ~((key_segment == PADDING) & (key != query)))


def shared_mask(segments: torch.Tensor, config):
    """The mask of the shared_prompt layout in the form the model's attention takes."""
    attention = getattr(config, "_attn_implementation", "eager")
    rows, width = segments.shape
    if attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(row, head, query, key):
            return may_attend(segments[row, query], segments[row, key], query, key)

        # On GPU the block mask is built compiled, a tile at a time, never as a dense [rows, T, T] tensor.
        return create_block_mask(mask_mod, rows, None, width, width, device=segments.device,
                                 _compile=segments.device.type == "cuda")
    position = torch.arange(width, device=segments.device)
    allowed = may_attend(segments[:, :, None], segments[:, None, :], position[:, None], position[None, :])[:, None]
    if attention == "eager":  # eager adds the mask to the scores
        return torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)
    return allowed  # sdpa takes the boolean mask as it is


def sequence_logps(model: torch.nn.Module, inputs: ModelInputs, *, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected), each [b] float32: log π(response | prompt), or its mean over the scored tokens."""
    totals = model(inputs).float()
    if average:
        counts = torch.zeros_like(totals).index_add(0, inputs.score_sequence, torch.ones_like(inputs.score_sequence,
                                                                                             dtype=totals.dtype))
        totals = torch.where(counts > 0, totals / counts.clamp(min=1), torch.zeros_like(totals))
    return totals[:inputs.num_pairs], totals[inputs.num_pairs:]


PROBE_PAIRS: list[Triple] = [([3, 5, 7, 11], [13, 2], [17, 19, 23]), ([29, 31], [37, 41, 43], [47])]


@torch.no_grad()
def settle_response_head(model: torch.nn.Module, policy: PolicyLogps, device, autocast) -> None:
    """Keep the response-only forward (`policy.response_only`) only if it scores as the full forward does on
    this model.

    `model` is `policy` or its DDP/FSDP wrapper: under FSDP the forward is
    collective, so every rank runs this probe. The two paths agree to float
    rounding (~1e-6 in fp32); the tolerance is 1e-4 in fp32 and 1e-2 in bf16.
    """
    if not policy.response_only:
        if response_head_parts(policy.lm) is not None:  # turned off in the config
            return
        log.warning("%s does not expose its body and output head (get_decoder, get_output_embeddings): logits are "
                    "computed at every position", type(policy.lm).__name__)
        return
    vocab = policy.lm.get_output_embeddings().weight.shape[0]
    pairs = [tuple([t % vocab for t in part] for part in pair) for pair in PROBE_PAIRS]
    inputs = lay_out(pairs, 0, "padded").to(device)
    was_training = model.training
    model.eval()
    with autocast:
        full = model(inputs, full_logits=True)
        response = model(inputs)
    model.train(was_training)
    half = isinstance(autocast, torch.autocast) or next(policy.lm.parameters()).dtype != torch.float32
    tolerance = 1e-2 if half else 1e-4
    if not torch.allclose(full, response, atol=tolerance, rtol=tolerance):
        policy.response_only = False
        log.warning("%s transforms its logits after the output head (full forward %s, head on hidden states %s): "
                    "logits are computed at every position", type(policy.lm).__name__, full.tolist(),
                    response.tolist())
