"""dpo.forward: the three layouts and the response-only head, against the plain forward.

The plain forward is the padded layout with `full_logits=True`: 2b right-padded
rows, logits at every position, read off where a response token is predicted.
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpo.config import DataConfig
from dpo.forward import (CHOSEN, PADDING, PROMPT, REJECTED, PolicyLogps, lay_out, sequence_logps,
                         settle_response_head, shared_mask)
from pairs import tokenized

LAYOUTS = ["padded", "packed", "shared_prompt"]
NO_AUTOCAST = contextlib.nullcontext()


def test_shared_layout_by_hand():
    """Prompt [5, 6], chosen [7], rejected [8, 9] in one row [5, 6, 7, 8, 9].

    Positions restart at len(prompt) = 2 for the rejected reply: [0, 1, 2, 2, 3].
    Token 7 (row position 2) is predicted by position 1; so is 8, the first
    rejected token, since the prompt ends there; 9 by position 3. Sequence 0 is
    the chosen reply of pair 0, sequence 1 (= b + 0) its rejected one. The
    rejected positions 3 and 4 see the prompt (0, 1) and themselves, never 2.
    """
    inputs = lay_out([([5, 6], [7], [8, 9])], pad_id=0, layout="shared_prompt")
    assert inputs.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 2, 3]]
    assert inputs.score_index.tolist() == [1, 1, 3]
    assert inputs.score_targets.tolist() == [7, 8, 9]
    assert inputs.score_sequence.tolist() == [0, 1, 1]
    assert inputs.segments.tolist() == [[PROMPT, PROMPT, CHOSEN, REJECTED, REJECTED]]
    allowed = shared_mask(inputs.segments, SimpleNamespace(_attn_implementation="sdpa"))[0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0],
                       [1, 1, 0, 1, 0],
                       [1, 1, 0, 1, 1]]


def test_a_padding_key_is_seen_by_itself_alone():
    """Pairs ([5], [7], [8]) and ([4], [6], [2, 3]): the first row, 5 7 8, pads to width 4.

    Its padding position 3 sees the row causally (0, 1, 2) and itself; no real token
    sees it, and rows 0-2 are those of the by-hand example above, without a prompt
    of two. Eager gets the same rule as 0 (attend) and float32's minimum (not).
    """
    inputs = lay_out([([5], [7], [8]), ([4], [6], [2, 3])], pad_id=0, layout="shared_prompt")
    assert inputs.segments[0].tolist() == [PROMPT, CHOSEN, REJECTED, PADDING]
    allowed = shared_mask(inputs.segments, SimpleNamespace(_attn_implementation="sdpa"))
    assert allowed[0, 0].int().tolist() == [[1, 0, 0, 0],
                                            [1, 1, 0, 0],
                                            [1, 0, 1, 0],
                                            [1, 1, 1, 1]]
    added = shared_mask(inputs.segments, SimpleNamespace(_attn_implementation="eager"))
    assert torch.equal(added == 0, allowed) and set(added.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}


def test_padded_and_packed_layouts_by_hand():
    """Pairs ([5], [7], [8, 9]) and ([4, 3], [6], [2]), b = 2.

    Padded: rows 5 7 | 4 3 6 | 5 8 9 | 4 3 2, width 3, so row j starts at flat
    3j: 7 is predicted at 0, 6 at 3 + 1 = 4, 8 and 9 at 6 and 7, 2 at 9 + 1 = 10.
    Packed: one row 5 7 4 3 6 5 8 9 4 3 2 with positions 0 1 0 1 2 0 1 2 0 1 2.
    """
    pairs = [([5], [7], [8, 9]), ([4, 3], [6], [2])]
    padded = lay_out(pairs, pad_id=0, layout="padded")
    assert padded.input_ids.tolist() == [[5, 7, 0], [4, 3, 6], [5, 8, 9], [4, 3, 2]]
    assert padded.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    assert padded.score_index.tolist() == [0, 4, 6, 7, 10]
    assert padded.score_targets.tolist() == [7, 6, 8, 9, 2]
    assert padded.score_sequence.tolist() == [0, 1, 2, 2, 3]
    packed = lay_out(pairs, pad_id=0, layout="packed")
    assert packed.input_ids.tolist() == [[5, 7, 4, 3, 6, 5, 8, 9, 4, 3, 2]]
    assert packed.position_ids.tolist() == [[0, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert packed.score_index.tolist() == [0, 3, 5, 6, 9]
    assert packed.score_sequence.tolist() == [0, 1, 2, 2, 3]


def test_a_reply_without_a_prompt_is_refused():
    """Nothing would predict 7, the reply's first token: every layout refuses the pair (tests/test_edges.py)."""
    for layout in LAYOUTS:
        with pytest.raises(ValueError, match="empty prompt"):
            lay_out([([], [7, 6], [8, 9])], pad_id=0, layout=layout)


@pytest.fixture(scope="module")
def lm(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def hh(hh_pairs, tiny_model):
    return tokenized(hh_pairs, "implicit", tiny_model, DataConfig(max_length=256, max_prompt_length=192), limit=24)


def test_every_layout_and_the_response_head_equal_the_plain_forward_on_hh(lm, hh):
    """Real HH pairs (prompts of up to 192 tokens, 256 in all), fp32: within 1e-5 nats per sequence."""
    policy = PolicyLogps(lm, chunk_size=64)
    with torch.no_grad():
        plain = policy(lay_out(hh, 0, "padded"), full_logits=True)
        for layout in LAYOUTS:
            for full in (True, False):
                got = policy(lay_out(hh, 0, layout), full_logits=full)
                assert (got - plain).abs().max() <= 1e-5, (layout, full, float((got - plain).abs().max()))
    assert plain.abs().min() > 10  # real sums, not zeros


def test_flex_attention_scores_the_shared_layout_as_the_plain_forward(tiny_model, lm, hh):
    """The shared layout under transformers' flex_attention, whose mask is a BlockMask built from
    `may_attend` rather than a dense [T, T] tensor: within 1e-5 of the plain forward on 24 HH pairs.

    On CPU, FlexAttention runs forward only (no backward), so this is the scorer's case; training
    with it needs a GPU (bench/gpu_check.py). A rejected reply that saw the chosen one would miss by
    nats, not 1e-5.
    """
    from transformers import AutoModelForCausalLM

    flex = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32,
                                                attn_implementation="flex_attention").eval()
    with torch.no_grad():
        plain = PolicyLogps(lm, chunk_size=64)(lay_out(hh, 0, "padded"), full_logits=True)
        got = PolicyLogps(flex, chunk_size=64)(lay_out(hh, 0, "shared_prompt"))
    assert (got - plain).abs().max() <= 1e-5, float((got - plain).abs().max())


def test_the_plain_forward_scores_as_one_pair_per_forward(lm, hh, independent_logp, tiny_model):
    """The yardstick itself, against one pair per forward and a hand loop over the tokens."""
    policy = PolicyLogps(lm, chunk_size=64)
    with torch.no_grad():
        plain = policy(lay_out(hh[:4], 0, "padded"), full_logits=True)
    expected = [independent_logp(tiny_model, p, c) for p, c, _ in hh[:4]] + \
               [independent_logp(tiny_model, p, r) for p, _, r in hh[:4]]
    assert max(abs(a - b) for a, b in zip(plain.tolist(), expected)) <= 1e-5


def dpo_loss_gradients(lm, pairs, layout, full, ref):
    """Gradient of a sigmoid DPO loss (β = 0.1) against fixed reference sums, per parameter."""
    policy = PolicyLogps(lm, chunk_size=50)
    lm.zero_grad()
    chosen, rejected = sequence_logps(lambda x: policy(x, full_logits=full), lay_out(pairs, 0, layout), average=False)
    loss = -torch.nn.functional.logsigmoid(0.1 * ((chosen - ref[0]) - (rejected - ref[1]))).mean()
    loss.backward()
    return {name: p.grad.clone() for name, p in lm.named_parameters()}


def test_dpo_gradients_equal_the_plain_forwards(lm, hh):
    """Shared layout and response-only head (chunks of 50 positions, checkpointed): every parameter's gradient
    equals the plain forward's within 1e-5 relative to its norm. The reference sums are offset so that the loss is not at
    its symmetric point."""
    pairs = hh[:8]
    ref = torch.full((8,), -150.0), torch.full((8,), -140.0)
    lm.train()
    try:
        plain = dpo_loss_gradients(lm, pairs, "padded", True, ref)
        shared = dpo_loss_gradients(lm, pairs, "shared_prompt", False, ref)
    finally:
        lm.eval()
        lm.zero_grad()
    for name, grad in plain.items():
        assert grad.norm() > 0, name
        assert (shared[name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_changing_a_chosen_token_leaves_the_rejected_reply_alone(lm):
    """With the prompt shared, the mask is what keeps the rejected reply from seeing the chosen one: change a
    chosen token and the chosen log-prob moves, the rejected one does not (to the bit, under eager attention)."""
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(lm.name_or_path, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    for model in (lm, eager):
        policy = PolicyLogps(model, chunk_size=16)
        prompt, chosen, rejected = [11, 12, 13, 14], [21, 22, 23], [31, 32, 33, 34]
        with torch.no_grad():
            before = policy(lay_out([(prompt, chosen, rejected)], 0, "shared_prompt"))
            after = policy(lay_out([(prompt, [21, 99, 23], rejected)], 0, "shared_prompt"))
        assert abs(float(after[0] - before[0])) > 1e-3
        assert abs(float(after[1] - before[1])) <= 1e-6


def test_a_model_that_caps_its_logits_keeps_the_full_forward(tmp_path):
    """Gemma 2 soft-caps its logits after the head (30·tanh(z/30)): head(body(x)) is not its output, so the probe
    turns the response-only path off and the scores stay those of its own forward."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # logits of a trained model's size, not an initialisation's hundredths
        model.get_output_embeddings().weight.mul_(100)
    policy = PolicyLogps(model, chunk_size=8)
    assert policy.response_only
    pairs = [([1, 2, 3], [4, 5], [6])]
    with torch.no_grad():
        capped = policy(lay_out(pairs, 0, "padded"), full_logits=True)
        uncapped = policy(lay_out(pairs, 0, "padded"))
    assert (capped - uncapped).abs().max() > 0.01  # the response-only path would be wrong here
    settle_response_head(policy, policy, "cpu", NO_AUTOCAST)
    assert not policy.response_only
    with torch.no_grad():
        assert torch.equal(policy(lay_out(pairs, 0, "padded")), capped)


def test_a_plain_llama_passes_the_probe(lm):
    policy = PolicyLogps(lm, chunk_size=8)
    settle_response_head(policy, policy, "cpu", NO_AUTOCAST)
    assert policy.response_only


def test_hf_scores_stay_within_1e5_of_the_plain_forward(tiny_model, lm, hh):
    """The hf scorer (shared layout, response-only head, length-sorted batches) on HH, fp32."""
    from pipeline.hf_scorer import HFScorer

    policy = PolicyLogps(lm, chunk_size=64)
    with torch.no_grad():
        plain = policy(lay_out(hh, 0, "padded"), full_logits=True).tolist()
    scorer = HFScorer(tiny_model, batch_tokens=1024)
    assert scorer.runtime.layout == "shared_prompt" and scorer.runtime.policy.response_only
    scores = scorer.score(hh)
    got = [c for c, _ in scores] + [r for _, r in scores]
    assert max(abs(a - b) for a, b in zip(got, plain)) <= 1e-5
    assert np.all(np.isfinite(got))
