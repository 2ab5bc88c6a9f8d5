"""dpo.logprobs against a plain per-token loop: the yardstick both scoring and training rely on."""

import math

import torch

from dpo.logprobs import sequence_logps, token_logps


def loop_logps(logits, labels, average=False, ignore_index=-100):
    out = []
    for b in range(labels.shape[0]):
        total, count = 0.0, 0
        for t in range(1, labels.shape[1]):
            if labels[b, t] == ignore_index:
                continue
            total += float(torch.log_softmax(logits[b, t - 1].double(), dim=-1)[labels[b, t]])
            count += 1
        out.append(total / count if average and count else (0.0 if average else total))
    return torch.tensor(out, dtype=torch.float64)


def batch():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 11) * 3
    labels = torch.randint(0, 11, (4, 7))
    labels[0, :3] = -100            # a prompt
    labels[1, 5:] = -100            # padding
    labels[2, :] = -100             # no counted token at all
    labels[3, 0] = -100
    return logits, labels


def test_sum_matches_loop():
    logits, labels = batch()
    assert torch.allclose(sequence_logps(logits, labels).double(), loop_logps(logits, labels), atol=1e-5)


def test_average_matches_loop():
    logits, labels = batch()
    got = sequence_logps(logits, labels, average=True).double()
    assert torch.allclose(got, loop_logps(logits, labels, average=True), atol=1e-5)


def test_row_without_counted_tokens_is_zero_not_nan():
    logits, labels = batch()
    for average in (False, True):
        value = float(sequence_logps(logits, labels, average=average)[2])
        assert value == 0.0 and not math.isnan(value)


def test_first_label_is_never_scored():
    """logits[:, t] predict labels[:, t+1]: the label at position 0 has nothing before it."""
    logits, labels = batch()
    changed = labels.clone()
    changed[3, 0] = 5
    assert torch.equal(sequence_logps(logits, labels), sequence_logps(logits, changed))


def test_token_logps_mask_and_dtype():
    logits, labels = batch()
    logps, mask = token_logps(logits.to(torch.bfloat16), labels)
    assert logps.dtype == torch.float32 and logps.shape == (4, 6)
    assert torch.equal(mask, labels[:, 1:] != -100)
    assert torch.all(logps[~mask] == 0)
