"""Per-token log-probabilities from hidden states, a chunk of positions at a time.

Scoring (the reference cache) and training both go through `chunked_token_logps`
(via dpo.forward), so the two stages compute the same tokens the same way.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def chunked_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                        chunk_size: int) -> torch.Tensor:
    """log p(targets[n] | hidden[n]) = (head(h_n))[target_n] - logsumexp(head(h_n)), `chunk_size` rows at a time.

    Args:
        head: the output projection, hidden size H -> vocabulary V (tied or not).
        hidden: [N, H], the hidden states of the N positions that predict a scored token.
        targets: [N] token ids.
        chunk_size: rows whose [chunk_size, V] logits exist at once.

    Returns:
        [N] float32. Under autograd each chunk is checkpointed: its logits are
        recomputed in the backward pass rather than kept, so the peak is
        O(chunk_size x V) however many positions are scored, not O(N x V).
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on N")
    grad = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        parts.append(checkpoint(_chunk_logps, head, h, t, use_reentrant=False) if grad else _chunk_logps(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # the log-softmax is taken in float32 whatever the model's dtype
    # gather - logsumexp: no second [chunk, V] log-softmax tensor.
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def gathered_token_logps(logits: torch.Tensor, index: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same values read off full logits [R, T, V] at flat positions `index` [N] of the [R, T] grid: [N] float32."""
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()
    return rows.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
