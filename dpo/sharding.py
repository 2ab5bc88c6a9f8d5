"""The policy on a training worker: whole on every rank (ddp) or sharded over them (fsdp).

ddp: every rank reads the weights and keeps a whole copy; Ray Train's
prepare_model wraps it in DistributedDataParallel.

fsdp (FSDP2, `fully_shard`): only rank 0 reads the weights, on CPU; every other
rank builds the model on the meta device, which takes no memory. Each decoder
layer and then the whole model are sharded over all ranks, and rank 0's
weights are broadcast into the shards. So loading costs a node one CPU copy of
the model, not one per rank, and a GPU holds 1/world of the weights, gradients
and optimizer state at rest and one decoder layer in full while it computes.
Sharding only the root, which is what prepare_model(parallel_strategy="fsdp")
does without a wrap policy, gathers the whole model for every forward pass and
saves nothing while it computes. FSDP2 runs over gloo too, so the CPU tests
run this very path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from dpo.config import Config
from dpo.errors import UserError
from dpo.model_folders import model_dir, read_model_config
from dpo.forward import PolicyLogps
from dpo.lora import add_adapters
from dpo.runtime import load_lm


def load_policy(cfg: Config, device: torch.device, rank: int) -> PolicyLogps:
    """The policy in float32 on `device`, as the module that computes DPO's log-probs (dpo.forward):
    whole under ddp (not yet wrapped), sharded under fsdp; with model.lora, its `lm` is peft's model."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(dtype=torch.float32, trust_remote_code=cfg.model.trust_remote_code,
                  attn_implementation=cfg.model.attn_implementation)
    if cfg.train.strategy == "ddp" or rank == 0:
        lm = load_lm(model_dir(cfg.model.policy, "model.policy"), **kwargs)
        if cfg.train.strategy == "ddp":
            return _policy(lm, cfg).to(device)
    else:
        config = read_model_config(cfg.model.policy, "model.policy", cfg.model.trust_remote_code)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, **kwargs)
    return _shard(_policy(lm, cfg), device, rank)


def _policy(lm: torch.nn.Module, cfg: Config) -> PolicyLogps:
    if cfg.train.gradient_checkpointing:
        if not getattr(lm, "supports_gradient_checkpointing", False):
            raise UserError(f"train.gradient_checkpointing: {type(lm).__name__} does not support it; "
                            "set train.gradient_checkpointing=false")
        # Each decoder layer checkpoints itself when training (transformers' GradientCheckpointingLayer), so this
        # holds in PolicyLogps's response-only path too, which calls the body (get_decoder) rather than the whole
        # model. Non-reentrant: it composes with DDP's and FSDP2's hooks and needs no input that requires grad.
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora.enabled:
        lm = add_adapters(lm, cfg)  # before DDP or FSDP2 wraps it: they keep the base frozen as they find it
    return PolicyLogps(lm, cfg.model.logits_chunk_size, response_logits=cfg.train.response_logits == "auto")


def _shard(model: PolicyLogps, device: torch.device, rank: int) -> PolicyLogps:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model.lm, "_no_split_modules", None) or ())
    layers = [m for m in model.lm.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"train.strategy=fsdp: {type(model.lm).__name__} names no decoder layer class "
                        "(_no_split_modules), so it cannot be sharded layer by layer; use train.strategy=ddp")
    full = model.state_dict() if rank == 0 else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)  # fully_shard puts the shards on the current device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    # The root holds what no layer does (embeddings, final norm, output head), gathered around PolicyLogps.forward.
    fully_shard(model, mesh=mesh)  # moves rank 0's shards to the device; meta ones stay meta
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers are not in the state dict when they are non-persistent (rotary inv_freq): rank 0's are the real ones.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Context for one micro-step: gradients are reduced across ranks only when `sync`."""
    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DistributedDataParallel
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()  # one worker: nothing to reduce


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradients to `max_norm` over all ranks; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # sharded gradients give a DTensor norm
        norm = norm.full_tensor()
    return float(norm)
