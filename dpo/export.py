"""The trained policy in Hugging Face format (`save_policy`): weights, config and tokenizer.

The weights are written as safetensors one tensor in memory at a time.

`save_pretrained` wants the whole state dict on one process; at 70B that is
280 GB of fp32 on rank 0. Here every rank walks the state dict in the same
order; a sharded tensor (FSDP2's DTensor) is gathered whole, written by rank 0
and let go before the next one, so rank 0 holds its own shards plus one whole
tensor (never more than the largest layer). The safetensors format makes this
possible: a file is an 8-byte little-endian header length, a JSON header
naming each tensor's dtype, shape and byte range, then the raw bytes in that
order. The header is planned from the tensors' global shapes before anything
is gathered, so each byte is written once, in order, to a local path or an
object store alike. Past `file_bytes`, tensors go to further files
(`model-00001-of-0000N.safetensors`) and `model.safetensors.index.json` maps
each name to its file, as transformers' `from_pretrained` and vLLM read them.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from typing import Iterable

import pyarrow.fs as pafs
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dpo import storage
from dpo.config import Config
from dpo.lora import ADAPTER_DIR, save_merged
from dpo.model_folders import model_dir

# The most tensor bytes in one file: a few GiB keeps an object store's upload and a reader's mmap per file modest.
FILE_BYTES = 4 * 2**30
INDEX = "model.safetensors.index.json"
# PolicyLogps holds the transformers model as `lm`: its keys in checkpoints, not in the exported policy/.
LM_PREFIX = "lm."
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def tied_aliases(module: torch.nn.Module) -> set[str]:
    """Names of parameters that are another one (tied embeddings), each after its first name: safetensors
    holds no aliases, and transformers ties them again when it loads."""
    seen: set[int] = set()
    aliases = set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return aliases


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()  # a DTensor's numel is its global one


def plan_files(state: dict[str, torch.Tensor], file_bytes: int) -> list[list[str]]:
    """The names of each file, in state order, each file under `file_bytes` unless one tensor alone is larger."""
    files: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        if files[-1] and size + _nbytes(tensor) > file_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += _nbytes(tensor)
    return files


def file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _header(state: dict[str, torch.Tensor], names: Iterable[str]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        tensor = state[name]
        entries[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape),
                         "data_offsets": [offset, offset + _nbytes(tensor)]}
        offset += _nbytes(tensor)
    header = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)  # the tensors' bytes start 8-aligned
    return struct.pack("<Q", len(header)) + header


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU; gathered from every rank's shard when it is a DTensor (collective)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def write_safetensors(state: dict[str, torch.Tensor], dest: str, *, rank: int,
                      file_bytes: int = FILE_BYTES) -> list[str]:
    """Write `state` into the folder `dest` as safetensors; every rank calls it with its state dict (DTensors
    are gathered one at a time), rank 0 writes. Returns the file names."""
    files = plan_files(state, file_bytes)
    names = file_names(len(files))
    for file_name, members in zip(names, files):
        # Ranks other than 0 take part in the gathers and write nothing.
        with storage.open_output(storage.join(dest, file_name)) if rank == 0 else contextlib.nullcontext() as out:
            if out is not None:
                out.write(_header(state, members))
            for name in members:
                whole = _whole(state[name])
                if out is not None:
                    out.write(whole.reshape(-1).view(torch.uint8).numpy().data)
                del whole
    if rank == 0 and len(files) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(t) for t in state.values())},
                 "weight_map": {name: file_name for file_name, members in zip(names, files) for name in members}}
        storage.write_text(storage.join(dest, INDEX), json.dumps(index, indent=2))
    return names


def save_policy(model: torch.nn.Module, lm, cfg: Config, dest: str, *, rank: int, train_dir: str) -> None:
    """The trained weights and the tokenizer, in Hugging Face format, gathered one tensor at a time; every rank
    calls it. `model` runs the policy as training does (DDP, FSDP), `lm` is its transformers model."""
    if cfg.model.lora.enabled:
        _save_merged_policy(model, lm, cfg, dest, rank=rank, train_dir=train_dir)
        return
    state = {name.removeprefix(LM_PREFIX): tensor for name, tensor in get_model_state_dict(model).items()}
    for alias in tied_aliases(lm):
        state.pop(alias, None)
    if rank == 0:
        storage.delete_dir(dest)
    write_safetensors(state, dest, rank=rank)
    if rank != 0:
        return
    with tempfile.TemporaryDirectory(prefix="dpo-policy-") as tmp:
        lm.config.save_pretrained(tmp)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(tmp)
        save_tokenizer(cfg, tmp)
        fs, path = storage.resolve(dest)
        pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def _save_merged_policy(model: torch.nn.Module, lm, cfg: Config, dest: str, *, rank: int, train_dir: str) -> None:
    """Under model.lora: the adapters merged into the base by peft (dpo.lora), and the adapter alone beside
    `dest`. peft merges whole modules, so the model is gathered on rank 0's CPU for this, unlike `save_policy`."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    state = {name.removeprefix(LM_PREFIX): tensor for name, tensor in state.items()}
    with tempfile.TemporaryDirectory(prefix="dpo-policy-") as tmp:
        policy_dir, adapter_dir = os.path.join(tmp, "policy"), os.path.join(tmp, ADAPTER_DIR)
        save_merged(state, cfg, lm.config, policy_dir, adapter_dir)
        save_tokenizer(cfg, policy_dir)
        _publish(adapter_dir, storage.join(train_dir, ADAPTER_DIR))
        _publish(policy_dir, dest)


def save_tokenizer(cfg: Config, folder: str) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir(cfg.model.tokenizer_path, cfg.model.tokenizer_key, weights=False),
                                  trust_remote_code=cfg.model.trust_remote_code).save_pretrained(folder)


def _publish(local_dir: str, dest: str) -> None:
    """Replace the folder `dest` (a path or URI) by a copy of `local_dir`."""
    storage.delete_dir(dest)
    fs, path = storage.resolve(dest)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
