"""What a forward runs on: one object for training's forward and the hf scorer's.

Both score through dpo.forward's PolicyLogps. `Runtime` holds what they must
agree on: the device, the autocast, the loaded model (`load_lm` is the one
way a model is read from its folder), the pad id and the layout, which
`settle` chooses on the model itself once its weights are in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from dpo.forward import Layout, PolicyLogps, settle_response_head


def load_lm(path: str, *, dtype: torch.dtype, trust_remote_code: bool, attn_implementation: Optional[str]):
    """A causal LM from its folder; safetensors only: a pickled .bin checkpoint can run code when it is loaded."""
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                trust_remote_code=trust_remote_code, **kwargs)


def training_autocast(use_gpu: bool, dtype: str):
    """bf16 autocast only where it is fast and asked for; CPU trains in float32, the weights stay float32."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if use_gpu and dtype == "bfloat16" else contextlib.nullcontext()


def pad_id(lm) -> int:
    """Padding is masked out of attention and never scored: any valid id will do."""
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(lm.config, key, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def choose_layout(layout: str, attention: str, device: torch.device, packs: Callable[[], bool]) -> Layout:
    """train.layout resolved on this model and device: auto where each layout pays.

    Packed only under flash attention, whose varlen kernels make it less work,
    and only if the model honours packed position ids (`packs()`, asked only
    then). The prompt shared where that was measured to be faster
    (docs/benchmarks.md): on CPU, where eager and sdpa attention take its 4D
    mask; on GPU only when asked for (with flex_attention) until it is measured
    there.
    """
    if layout != "auto":
        return layout
    if attention.startswith("flash") and packs():
        return "packed"
    if device.type == "cpu" and attention in ("eager", "sdpa"):
        return "shared_prompt"
    return "padded"


@dataclass
class Runtime:
    device: torch.device
    policy: PolicyLogps          # its `lm` is the transformers model
    model: torch.nn.Module       # `policy` as the forward runs it: itself, or wrapped in DDP or sharded by FSDP
    autocast: Any = field(default_factory=contextlib.nullcontext)  # re-entered at every forward
    layout: Layout = "padded"    # chosen by `settle`

    @property
    def attention(self) -> str:
        return str(getattr(self.policy.lm.config, "_attn_implementation", "") or "")

    @property
    def pad_id(self) -> int:
        return pad_id(self.policy.lm)

    def settle(self, layout: str = "auto", packs: Callable[[], bool] = lambda: False) -> None:
        """With the weights in (under FSDP, after a restore: a forward leaves FSDP2's root unsharded, and a
        sharded state dict cannot load into that): the response-only head checked on this model, the layout
        chosen."""
        settle_response_head(self.model, self.policy, self.device, self.autocast)
        self.layout = choose_layout(layout, self.attention, self.device, packs)
