"""The fingerprint that ties a prepared or reference dataset to the config that made it.

A cached reference score is only valid for the exact tokens it scored, under the
exact reference weights. The fingerprint records everything that decides those;
training recomputes it from its own config and refuses a dataset whose
fingerprint differs, naming the field.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

from dpo.config import Config
from dpo.errors import UserError
from dpo.model_folders import model_dir, tokenizer_files, weight_names
from dpo.storage import exists, is_uri, join, read_text, resolve

MANIFEST = "_manifest.json"
_CACHE = os.path.expanduser(os.environ.get("RAYDPO_HASH_CACHE", "~/.cache/raydpo/hashes.json"))


class FingerprintMismatch(UserError):
    pass


class IncompleteDataset(UserError):
    pass


def _sha256_file(path: str) -> str:
    """Full content hash, cached on (path, size, mtime): weights of a 70B model take minutes to hash. A URI
    (s3://, gs://, ...) is read through its filesystem; its store's mtime is the time the object was
    written, so an object replaced in place is hashed again. A store that gives no mtime is hashed each time."""
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    mtime = info.mtime_ns
    key = f"{path if is_uri(path) else os.path.abspath(path)}|{info.size}|{mtime}"
    cache: dict = {}
    try:
        with open(_CACHE, encoding="utf-8") as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        pass
    if mtime is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with fs.open_input_stream(inner, compression=None) as fh:  # the bytes as stored, a .gz too
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    cache[key] = h.hexdigest()
    try:
        os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
        tmp = f"{_CACHE}.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(cache, fh)
        os.replace(tmp, _CACHE)
    except OSError:
        pass  # the cache only saves time
    return cache[key]


def _hash_files(folder: str, names: list[str]) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(name.encode() + b"\0" + _sha256_file(join(folder, name)).encode())
    return h.hexdigest()[:32]


def weights_hash(path: str, key: str = "model.reference") -> str:
    """The weight files' hash, the same for a local folder and for its copy in an object store, whose objects
    are read where they are (never copied to the node that asks)."""
    names = weight_names(path, key)
    if not names:
        raise UserError(f"{key}: {path} holds no weight files (*.safetensors)")
    return _hash_files(path.rstrip("/"), names)


def tokenizer_hashes(path: str, key: str = "model.tokenizer") -> tuple[str, str]:
    """(tokenizer files hash, chat template hash)."""
    tokenizer_dir = model_dir(path, key, weights=False)
    names = tokenizer_files(tokenizer_dir, key)
    template = ""
    jinja = os.path.join(tokenizer_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as fh:
            template = fh.read()
    elif os.path.exists(config := os.path.join(tokenizer_dir, "tokenizer_config.json")):
        try:
            with open(config, encoding="utf-8") as fh:
                settings = json.load(fh)
        except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON
            settings = exc
        if not isinstance(settings, dict):
            why = settings if isinstance(settings, Exception) else f"a JSON {type(settings).__name__}, not an object"
            raise UserError(f"{key}: cannot read {config} ({why}), so its chat template cannot be part of the "
                            "fingerprint; fix or replace the file") from None
        template = json.dumps(settings.get("chat_template") or "")
    return _hash_files(tokenizer_dir, names), hashlib.sha256(template.encode()).hexdigest()[:32]


def input_files_hash(files: list[str]) -> list[dict]:
    """Each input file's name, size and content hash, local or on an object store alike."""
    out = []
    for path in files:
        fs, inner = resolve(path)
        out.append({"name": os.path.basename(inner), "size": fs.get_file_info(inner).size,
                    "sha256": _sha256_file(path)[:32]})
    return out


def compute(cfg: Config, files: list[str], *, with_reference: bool, tokenization_version: str) -> dict:
    """The fingerprint of the dataset that `cfg` would produce from `files`."""
    tok_hash, template_hash = tokenizer_hashes(cfg.model.tokenizer_path, cfg.model.tokenizer_key)
    fp = {
        "reference_model": weights_hash(cfg.model.reference_path, cfg.model.reference_key) if with_reference else None,
        "tokenizer": tok_hash,
        "chat_template": template_hash,
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "truncation": cfg.data.truncation,
        "input_files": input_files_hash(files),
        "tokenization_version": tokenization_version,
    }
    return fp


FIELD_FIXES = {
    "reference_model": "the reference weights differ (model.reference, or model.policy when it is null)",
    "tokenizer": "the tokenizer differs (model.tokenizer / model.policy)",
    "chat_template": "the tokenizer's chat template differs",
    "max_length": "data.max_length differs",
    "max_prompt_length": "data.max_prompt_length differs",
    "truncation": "data.truncation differs",
    "input_files": "the input files (data.train_files) differ in name or content",
    "tokenization_version": "the tokenization code changed since the dataset was written",
    "scorer": "the scores were made by another backend, vLLM build or version, or dtype "
              "(reference.backend, the installed vLLM, model.dtype)",
}


def diff(expected: dict, found: dict) -> list[str]:
    return [k for k in expected if expected.get(k) != found.get(k)]


def read_manifest(folder: str, made_by: str = "jobs.precompute_reference") -> dict:
    """The manifest of a finished dataset; `made_by` is the job that writes it, named when there is none."""
    path = join(folder, MANIFEST)
    if not exists(folder):
        raise IncompleteDataset(f"{folder} does not exist; {made_by} (or jobs.pipeline) makes it from this config")
    if not exists(path):
        raise IncompleteDataset(
            f"{folder} has no {MANIFEST}: it was never finished (or is still being written); "
            "run jobs.precompute_reference (or jobs.prepare) to complete it"
        )
    return json.loads(read_text(path))


def check(folder: str, expected: dict, manifest: Optional[dict] = None,
          made_by: str = "jobs.precompute_reference") -> dict:
    """Refuse a dataset whose fingerprint differs from `expected`; return its manifest."""
    manifest = manifest or read_manifest(folder, made_by)
    found = manifest.get("fingerprint", {})
    fields = diff(expected, found)
    if fields:
        first = fields[0]
        raise FingerprintMismatch(
            f"{folder} was made with a different config: {FIELD_FIXES.get(first, first)} "
            f"(field '{first}': dataset has {_short(found.get(first))}, config gives {_short(expected.get(first))})"
            f"{' and ' + ', '.join(fields[1:]) + ' differ too' if fields[1:] else ''}; "
            "rerun the precompute into a new run.output_dir, or point the config back at what made it"
        )
    return manifest


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
