"""Whether data.max_length fits in a model's positions, read off its config.json.

A RoPE model handed a sequence longer than it was built for does not fail: it
extrapolates and returns log-probs that are quietly wrong. So the stages check
the length against the model's config before they start, and name the fix.
"""

from __future__ import annotations

from typing import Optional

from dpo.config import UserError


def read_model_config(path: str, key: str, trust_remote_code: bool = False):
    """The model's transformers config; a folder without a readable config.json is the user's mistake."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{key}: cannot read the model config in {path}: {str(exc).splitlines()[0]}; "
                        "it must hold a Hugging Face config.json") from None


def max_positions(hf_config) -> Optional[int]:
    """Longest sequence the model takes, or None where its config does not say.

    A config with a RoPE scaling (yarn, llama3, dynamic, ...) stretches
    max_position_embeddings in ways that differ by scheme, so it goes unchecked
    here rather than refused wrongly.
    """
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    limit = getattr(hf_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def check_max_length(hf_config, *, max_length: int, key: str, path: str, extra: int = 0, why: str = "") -> None:
    """Refuse a data.max_length (+ `extra` positions the backend needs) beyond the model's positions."""
    limit = max_positions(hf_config)
    if limit is None or max_length + extra <= limit:
        return
    need = f"data.max_length + {extra} = {max_length + extra} positions" if extra else \
        f"data.max_length = {max_length} positions"
    raise UserError(f"{key}: {path} takes at most {limit} positions (max_position_embeddings) but this run needs "
                    f"{need}{why}; longer sequences would be scored with positions the model never learned. "
                    f"Lower data.max_length to {limit - extra} or use a model with a longer context")
