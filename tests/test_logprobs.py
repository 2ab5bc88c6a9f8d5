"""dpo.logprobs against a plain per-token loop: the yardstick both scoring and training rely on."""

import math

import pytest
import torch

from dpo.logprobs import chunked_token_logps, gathered_token_logps


def loop_logps(logits, targets):
    """log_softmax(logits[n])[targets[n]], one row at a time, in float64."""
    return torch.tensor([float(torch.log_softmax(logits[n].double(), dim=-1)[targets[n]])
                         for n in range(len(targets))], dtype=torch.float64)


def head_and_rows(n=13, hidden=6, vocab=11, tied=False):
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    if tied:  # an output head that shares its weight with an embedding, as tied models do
        embedding = torch.nn.Embedding(vocab, hidden)
        head.weight = embedding.weight
    h = torch.randn(n, hidden) * 3
    targets = torch.randint(0, vocab, (n,))
    return head, h, targets


def test_a_worked_example():
    """Logits [0, ln 3] at one position, target 1: log(3 / (1 + 3)) = ln 0.75 = -0.287682."""
    head = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0], [math.log(3)]]))
    got = chunked_token_logps(head, torch.ones(1, 1), torch.tensor([1]), chunk_size=1)
    assert got.item() == pytest.approx(math.log(0.75), abs=1e-7)


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_chunks_equal_the_loop(chunk):
    head, h, targets = head_and_rows()
    with torch.no_grad():
        expected = loop_logps(head(h), targets)
        got = chunked_token_logps(head, h, targets, chunk)
    assert got.dtype == torch.float32 and got.shape == (13,)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_gathered_full_logits_equal_the_loop():
    """Flat index 2*4 + 1 = row 2, position 1 of a [3, 4, V] grid."""
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11)
    index, targets = torch.tensor([9, 0, 11]), torch.tensor([5, 2, 7])
    got = gathered_token_logps(logits.to(torch.bfloat16), index, targets)
    assert got.dtype == torch.float32
    expected = loop_logps(logits.to(torch.bfloat16).reshape(12, 11)[index], targets)
    assert torch.allclose(got.double(), expected, atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_checkpointed_chunks_give_the_unchunked_gradients(tied):
    """Recomputing each chunk's logits in backward changes nothing: the gradients of the head's weight and of the
    hidden states equal those of one unchunked pass."""
    head, h, targets = head_and_rows(tied=tied)
    grads = []
    for chunk in (13, 3):
        head.zero_grad()
        x = h.clone().requires_grad_(True)
        chunked_token_logps(head, x, targets, chunk).sum().backward()
        grads.append((head.weight.grad.clone(), x.grad.clone()))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_no_scored_position_gives_an_empty_result():
    head, h, targets = head_and_rows()
    assert chunked_token_logps(head, h[:0], targets[:0], 4).shape == (0,)
