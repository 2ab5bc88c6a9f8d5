"""Model folders: whether each one the config names is there, and whether data.max_length fits its positions.

Models are read from local folders only (the design assumes no hub access), so
a folder that is not there is refused here, naming the key that gave it,
before transformers would take the name for a hub id and retry the hub.

A RoPE model handed a sequence longer than it was built for does not fail: it
extrapolates and returns log-probs that are quietly wrong. So the stages check
the length against the model's config before they start, and name the fix.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from dpo.config import ModelConfig
from dpo.errors import UserError

# Where configs/quickstart.yaml puts the model that `--build-model quickstart` builds.
QUICKSTART_MODEL = "runs/quickstart/model"
# A folder holding none of these holds no tokenizer. The chat template is fingerprinted on its own
# field, so chat_template.jinja is not listed here.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json")


def check_model_folder(path: str, key: str) -> None:
    """Refuse a model or tokenizer path that is not a local folder, naming `key` and the fix."""
    if path and os.path.isdir(path):
        return
    if not path:
        raise UserError(f"{key} is not set; give the path of a Hugging Face model folder")
    if os.path.normpath(path) == QUICKSTART_MODEL:
        raise UserError(f"{key}: {path} does not exist; build the quickstart's model into it with "
                        "`python -m jobs.pipeline --config configs/quickstart.yaml --build-model quickstart`")
    raise UserError(f"{key}: {path} is not a folder; give the path of a Hugging Face model folder "
                    "(models are read from local folders, never from the model hub)")


def tokenizer_files(path: str, key: str) -> list[str]:
    """The tokenizer files in the folder `path`; a folder with none is refused, naming `key`."""
    check_model_folder(path, key)
    names = [n for n in os.listdir(path) if n in TOKENIZER_FILES]
    if not names:
        raise UserError(f"{key}: {path} holds no tokenizer files (tokenizer.json, ...); give a folder holding "
                        "a Hugging Face tokenizer")
    return names


def check_model_folders(model: ModelConfig, *, policy: bool, reference: bool) -> None:
    """Every model folder a job will read, checked before Ray starts so a wrong path fails in a moment."""
    tokenizer_files(model.tokenizer_path, model.tokenizer_key)
    if policy:
        check_model_folder(model.policy, "model.policy")
    if reference:
        check_model_folder(model.reference_path, model.reference_key)


def read_model_config(path: str, key: str, trust_remote_code: bool = False):
    """The model's transformers config; a folder without a readable config.json is the user's mistake."""
    from transformers import AutoConfig

    check_model_folder(path, key)
    if not trust_remote_code:
        _refuse_remote_code(path, key)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{key}: cannot read the model config in {path}: {str(exc).splitlines()[0]}; "
                        "it must hold a Hugging Face config.json") from None


def _refuse_remote_code(path: str, key: str) -> None:
    """A config.json whose auto_map names its own AutoConfig class: transformers would need to run the
    folder's code, which it does only with trust_remote_code (model.trust_remote_code)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            own = (json.load(fh).get("auto_map") or {}).get("AutoConfig")
    except (OSError, ValueError, AttributeError):
        return  # AutoConfig says what is wrong with the file
    if own:
        raise UserError(f"{key}: {path}'s config.json needs its own Python code ({own}); set "
                        "model.trust_remote_code=true if you trust that code")


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
