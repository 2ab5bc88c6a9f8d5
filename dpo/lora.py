"""LoRA (model.lora): low-rank adapters on the frozen policy, by peft.

peft wraps every target linear layer W of the policy as W x + (alpha / r) B A dropout(x), with A [r, in]
random and B [out, r] zero, and freezes everything else. At step 1 the policy is therefore exactly its base,
which is the reference (model.reference unset), and the first loss is ln 2 as in full fine-tuning. Since the
reference's scores are cached, no step runs the base without its adapters, the second forward that TRL pays
for on every step.

Where LoRA touches the training loop:

- dpo.sharding wraps the model (`add_adapters`) before DDP or FSDP2 sees it; AdamW gets only what trains;
- checkpoints keep only the parameters that train (dpo.checkpoint._tensors), so a restore loads the
  adapters and their AdamW moments over the base read again from model.policy;
- the export (`save_merged`) writes `policy/` as full weights, the adapters merged in by peft, which
  transformers and vLLM load like any model, and `adapter/` (beside `policy/`) in peft's own format,
  `PeftModel.from_pretrained(base, adapter_dir)`.
"""

from __future__ import annotations

import torch

from dpo.config import Config, LoraConfig
from dpo.errors import UserError

ADAPTER_DIR = "adapter"  # train/adapter/, beside train/policy/


def peft_config(lora: LoraConfig, base_path: str):
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                           base_model_name_or_path=base_path)


def add_adapters(lm: torch.nn.Module, cfg: Config) -> torch.nn.Module:
    """The peft model around `lm` (real or on the meta device): adapters that train, a base that does not."""
    import peft

    return peft.get_peft_model(lm, peft_config(cfg.model.lora, cfg.model.policy))


def check_lora_targets(cfg: Config, hf_config) -> None:
    """Every model.lora.target_modules name matches a linear layer of the policy; peft itself fails only when
    none does, and a misspelt name would silently leave those layers untrained."""
    if not cfg.model.lora.enabled:
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
    linear = {name.rsplit(".", 1)[-1] for name, module in lm.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [name for name in cfg.model.lora.target_modules if name not in linear]
    if missing:
        raise UserError(f"model.lora.target_modules: {', '.join(missing)} name{'s' if len(missing) == 1 else ''} no "
                        f"linear layer of {type(lm).__name__}; its linear layers are {', '.join(sorted(linear))}")


def save_merged(state: dict, cfg: Config, hf_config, policy_dir: str, adapter_dir: str) -> None:
    """Write the trained policy from its whole state dict (peft's keys, on CPU): the adapter alone into
    `adapter_dir`, then the base with the adapters merged in into `policy_dir`.

    The peft model is rebuilt on the meta device and takes `state`'s tensors as they are, so the export
    costs no second copy of the weights and no second read of model.policy.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                              trust_remote_code=cfg.model.trust_remote_code)
        model = add_adapters(lm, cfg)
    model.load_state_dict(state, assign=True)
    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    merged.save_pretrained(policy_dir, state_dict=merged.state_dict())
