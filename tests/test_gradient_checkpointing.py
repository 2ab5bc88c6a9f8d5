"""train.gradient_checkpointing: the same loss and gradients, with each decoder layer recomputed in the backward.

The policy is built by dpo.sharding.load_policy, as a training worker builds it, under DDP and under FSDP2, in
one process: a gloo process group of one rank. One rank shards nothing, but FSDP2's hooks (gather before a
layer's forward, again before its backward, which the recompute runs inside) and DDP's gradient hooks run as
on many; the two-worker Ray run of tests/test_training.py::test_lora_fsdp_with_checkpointing_matches_ddp runs it
over two.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from dpo.config import DataConfig, load_config
from dpo.forward import lay_out, sequence_logps
from dpo.losses import preference_loss
from dpo.sharding import load_policy
from pairs import tokenized

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "data")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def pairs(tiny_model):
    return tokenized(os.path.join(EXAMPLES, "train.jsonl"), "explicit", tiny_model,
                     DataConfig(max_length=64, max_prompt_length=48), limit=8)


def loss_and_gradients(tiny_model, pairs, strategy: str, checkpointing: bool):
    """Sigmoid DPO (β = 0.1) of 8 pairs in the shared layout through the response-only head, against reference
    sums offset from the policy's (so that the loss is not at its symmetric point); the loss, every parameter's
    gradient (whole, also where FSDP shards it), and how often the first decoder layer ran its forward."""
    cfg = load_config(None, [f"model.policy={tiny_model}", f"train.strategy={strategy}",
                             f"train.gradient_checkpointing={str(checkpointing).lower()}"])
    policy = load_policy(cfg, torch.device("cpu"), rank=0)
    assert policy.response_only
    model = torch.nn.parallel.DistributedDataParallel(policy) if strategy == "ddp" else policy
    calls = []
    # A pre-hook: the recompute stops as soon as it has what the backward needs, before any forward hook.
    policy.lm.get_decoder().layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    model.train()
    chosen, rejected = sequence_logps(model, lay_out(pairs, 0, "shared_prompt"), average=False)
    ref_chosen, ref_rejected = chosen.detach() - 3.0, rejected.detach() + 2.0
    loss = preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid", beta=0.1).losses.mean()
    loss.backward()
    grads = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for name, p in policy.named_parameters()}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_checkpointing_gives_the_same_loss_and_gradients(one_rank, tiny_model, pairs, strategy, one_torch_thread):
    """With checkpointing the first decoder layer runs twice (the forward, then its recompute in the backward),
    without it once: checkpointing is active in the response-only path, which calls the decoder, not the whole
    model. The margins are offset by 3 - (-2) = 5 nats from the reference's, so the loss is
    -log σ(0.1 · 5) = 0.474, not ln 2. Loss and every gradient agree within 1e-6 (fp32)."""
    loss_off, grads_off, calls_off = loss_and_gradients(tiny_model, pairs, strategy, checkpointing=False)
    loss_on, grads_on, calls_on = loss_and_gradients(tiny_model, pairs, strategy, checkpointing=True)
    assert (calls_off, calls_on) == (1, 2)
    assert abs(loss_off - 0.474077) < 1e-5
    assert abs(loss_on - loss_off) <= 1e-6
    assert grads_on.keys() == grads_off.keys()
    for name, grad in grads_off.items():
        assert grad.norm() > 0, name
        assert (grads_on[name] - grad).abs().max() <= 1e-6, (name, float((grads_on[name] - grad).abs().max()))
