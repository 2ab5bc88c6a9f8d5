"""The trained weights as Hugging Face safetensors, one tensor in memory at a time.

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
import struct
from typing import Iterable

import torch

from dpo import storage

# The most tensor bytes in one file: a few GiB keeps an object store's upload and a reader's mmap per file modest.
FILE_BYTES = 4 * 2**30
INDEX = "model.safetensors.index.json"
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
