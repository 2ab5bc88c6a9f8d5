"""Per-sequence log-probabilities from causal-LM logits.

Scoring (the reference cache) and training both go through `token_logps`, so the
two stages count exactly the same tokens under exactly the same mask.
"""

from __future__ import annotations

import torch


def token_logps(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100):
    """log p(labels[:, t+1] | ...) read off logits[:, t].

    Args:
        logits: [B, T, V], any float dtype; the log-softmax is taken in float32.
        labels: [B, T] token ids, `ignore_index` where a position is not counted
            (prompt, padding).

    Returns:
        (logps, mask): both [B, T-1]; logps is float32 and 0 wherever mask is False.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    logits = logits[:, :-1, :].float()
    labels = labels[:, 1:]
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    # gather - logsumexp avoids materialising a second [B, T, V] log-softmax tensor.
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)
    logps = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(mask, logps, torch.zeros_like(logps)), mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False, ignore_index: int = -100
) -> torch.Tensor:
    """Sum (or mean) over counted tokens of log p(token | every token before it).

    Args:
        logits: [B, T, V]; logits[:, t] predict labels[:, t + 1].
        labels: [B, T]; positions equal to `ignore_index` add nothing.
        average: divide by the number of counted tokens (a row with none gives 0, not NaN).

    Returns:
        [B] float32: log pi(y|x) = sum_t log p(y_t | x, y_<t), or its per-token mean.
    """
    logps, mask = token_logps(logits, labels, ignore_index=ignore_index)
    total = logps.sum(-1)
    if not average:
        return total
    count = mask.sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
