"""Model folders: whether each one the config names is there, and whether data.max_length fits its positions.

Models are read from local folders (the design assumes no hub access), so a
folder that is not there is refused here, naming the key that gave it, before
transformers would take the name for a hub id and retry the hub. A model named
by an object-store URI (s3://bucket/models/x) is copied once into each node's
cache (`model_dir`), and transformers and vLLM load that copy. What needs no
weights (the config, the tokenizer, the checks on the driver) copies everything
but the weights, so the head node of a 70B job does not store 140 GB; the
fingerprint hashes the weight objects' bytes in the store, the same bytes as a
local folder's.

A RoPE model handed a sequence longer than it was built for does not fail: it
extrapolates and returns log-probs that are quietly wrong. So the stages check
the length against the model's config before they start, and name the fix.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from typing import Optional

from dpo.config import ModelConfig
from dpo.errors import UserError
from dpo.storage import check_uri, is_uri, resolve

log = logging.getLogger("raydpo")

# Where configs/quickstart.yaml puts the model that `--build-model quickstart` builds.
QUICKSTART_MODEL = "runs/quickstart/model"
# This node's copies of the models named by URI, one folder per URI and state of its objects.
MODEL_CACHE_ENV = "RAYDPO_MODEL_CACHE"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
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


def model_dir(path: str, key: str, *, weights: bool = True) -> str:
    """The local folder holding what `key` names: `path` itself, or, for a URI, this node's copy of it;
    without `weights`, a copy of everything but the weight files does (the config, the tokenizer)."""
    if is_uri(path):
        return _node_copy(path.rstrip("/"), key, weights)
    check_model_folder(path, key)
    return path


def weight_names(path: str, key: str) -> list[str]:
    """The weight files' names in the folder or URI `path`, sorted, read from the store's listing for a URI."""
    if not is_uri(path):
        check_model_folder(path, key)
        return sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES))
    _, _, objects = _listing(path.rstrip("/"), key)
    return [name for name, _, _ in objects if "/" not in name and name.endswith(WEIGHT_SUFFIXES)]


def model_cache() -> str:
    return os.path.expanduser(os.environ.get(MODEL_CACHE_ENV, "~/.cache/raydpo/models"))


def _listing(uri: str, key: str):
    """(`uri`'s filesystem, its path there, every object under it as (name below it, size, time), sorted)."""
    import pyarrow.fs as pafs

    check_uri(uri, key)
    fs, root = resolve(uri)
    try:
        found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise UserError(f"{key}: cannot list {uri} ({str(exc).splitlines()[0]})") from None
    objects = sorted((info.path[len(root) + 1:], info.size, info.mtime_ns) for info in found
                     if info.type == pafs.FileType.File)
    if not objects:
        raise UserError(f"{key}: {uri} holds no files; give the URI of a folder holding a Hugging Face model "
                        "(config.json, *.safetensors, tokenizer files)")
    return fs, root, objects


def _node_copy(uri: str, key: str, weights: bool) -> str:
    """The folder `uri` downloaded into this node's cache, once; without `weights`, all but the weight files.

    The copy's name hashes the URI with every object's name, size and time, so an
    object replaced in the store makes a new copy rather than serving the old one.
    One process per node downloads (a file lock); the others wait and reuse it. The
    copy is assembled beside its place and renamed into it, so a download cut off
    midway is never taken for a model.
    """
    fs, root, objects = _listing(uri, key)
    state = hashlib.sha256(json.dumps([uri, objects]).encode()).hexdigest()[:20]
    cache = model_cache()
    whole = os.path.join(cache, f"{os.path.basename(root)}-{state}")
    copy = whole if weights else f"{whole}-no-weights"
    for ready in (whole, copy):  # a whole copy serves a reader that needs no weights too
        if os.path.isdir(ready):
            return ready
    if not weights:
        objects = [o for o in objects if not o[0].endswith(WEIGHT_SUFFIXES)]
    os.makedirs(cache, exist_ok=True)
    with open(f"{copy}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isdir(copy):
            return copy
        part = f"{copy}.part"  # a crashed download's leftover: no one else holds the lock
        shutil.rmtree(part, ignore_errors=True)
        for name, size, _ in objects:
            target = os.path.join(part, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with fs.open_input_stream(f"{root}/{name}", compression=None) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            if os.path.getsize(target) != size:
                raise OSError(f"{uri}/{name}: {os.path.getsize(target)} bytes read of {size}")
        os.rename(part, copy)
    log.info("%s: %s copied into %s (%d files, %.1f MB)", key, uri, copy, len(objects),
             sum(size for _, size, _ in objects) / 1e6)
    return copy


def tokenizer_files(path: str, key: str) -> list[str]:
    """The tokenizer files in the local folder `path`; a folder with none is refused, naming `key`."""
    check_model_folder(path, key)
    names = [n for n in os.listdir(path) if n in TOKENIZER_FILES]
    if not names:
        raise UserError(f"{key}: {path} holds no tokenizer files (tokenizer.json, ...); give a folder holding "
                        "a Hugging Face tokenizer")
    return names


def check_model_folders(model: ModelConfig, *, policy: bool, reference: bool) -> None:
    """Every model folder a job will read, checked before Ray starts so a wrong path fails in a moment."""
    tokenizer_files(model_dir(model.tokenizer_path, model.tokenizer_key, weights=False), model.tokenizer_key)
    if policy:
        model_dir(model.policy, "model.policy", weights=False)
    if reference:
        model_dir(model.reference_path, model.reference_key, weights=False)


def read_model_config(path: str, key: str, trust_remote_code: bool = False):
    """The model's transformers config; a folder without a readable config.json is the user's mistake."""
    from transformers import AutoConfig

    path = model_dir(path, key, weights=False)
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
