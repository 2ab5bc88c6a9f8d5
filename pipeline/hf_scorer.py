"""The hf backend: reference log-probs with transformers, on CPU or one GPU, through the training forward."""

from __future__ import annotations

from typing import Optional, Sequence

from dpo.schema import Triple

# Largest share of a scoring batch that may be padding (see pack_by_tokens).
MAX_PADDING = 0.1


def pack_by_tokens(lengths: Sequence[int], batch_tokens: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices grouped into batches whose padded size (longest × count) fits `batch_tokens`.

    Sorted by length, a batch also ends where the next sequence is more than
    `max_padding` shorter than the batch's longest: a large budget would
    otherwise pad a short sequence to the longest of hundreds, and padding costs
    as much as real tokens. Longest first, so an out-of-memory shows up in the
    first batch rather than hours in. A sequence longer than the budget still
    gets a batch of its own: it cannot be split.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else 0  # sorted descending: the first is the longest
        if current and (longest * (len(current) + 1) > batch_tokens or lengths[i] < (1 - max_padding) * longest):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


class HFScorer:
    """Reference log-probs with transformers, on CPU or one GPU.

    It runs dpo.forward's PolicyLogps, the training forward, on a dpo.runtime
    Runtime as training does: the layout training would take on this device
    and attention (one row per pair, the prompt computed once, where the
    attention takes the shared_prompt layout's mask), and the output head only at the
    positions that predict a response token.
    """

    def __init__(self, model_path: str, *, dtype: str = "float32", batch_tokens: int = 16384,
                 trust_remote_code: bool = False, attn_implementation: Optional[str] = None,
                 device: Optional[str] = None, logits_chunk_size: int = 1024):
        import torch

        from dpo.forward import PolicyLogps
        from dpo.runtime import Runtime, load_lm

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if attn_implementation is None and device.type == "cpu":
            # On CPU eager attention scores a sequence bit-identically in any batch; SDPA
            # takes another kernel for a batch without padding (~1e-8 relative drift).
            # Sorted batches are barely padded, so eager's masked scores cost little.
            attn_implementation = "eager"
        lm = load_lm(model_path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
                     attn_implementation=attn_implementation).to(device).eval()
        policy = PolicyLogps(lm, logits_chunk_size)
        self.runtime = Runtime(device=device, policy=policy, model=policy)
        self.runtime.settle()
        self.batch_tokens = batch_tokens

    def score(self, pairs: Sequence[Triple]) -> list[tuple[float, float]]:
        """(chosen, rejected) summed log-probs of each pair's replies given its prompt, float64, in input order."""
        # The tokens a pair's row(s) take: one row of both replies, or two rows of one each.
        if self.runtime.layout == "shared_prompt":
            lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
        else:
            lengths = [2 * (len(p) + max(len(c), len(r))) for p, c, r in pairs]
        out: list[tuple[float, float]] = [(0.0, 0.0)] * len(pairs)
        for batch in pack_by_tokens(lengths, self.batch_tokens):
            for i, value in zip(batch, self._forward([pairs[i] for i in batch])):
                out[i] = value
        return out

    def _forward(self, pairs: Sequence[Triple]) -> list[tuple[float, float]]:
        import torch

        from dpo.forward import lay_out

        rt = self.runtime
        with torch.inference_mode(), rt.autocast:
            totals = rt.policy(lay_out(pairs, rt.pad_id, rt.layout).to(rt.device)).double().tolist()
        return list(zip(totals[:len(pairs)], totals[len(pairs):]))
