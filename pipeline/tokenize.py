"""Tokenize normalised pairs: prompt and replies separately, then concatenated.

Tokenizing prompt+reply as one string lets a BPE merge or a chat template join
tokens across the boundary, so the prompt's tokens would not be a prefix of the
whole; training would then mask the wrong positions. Tokenizing the pieces
separately (as TRL does) makes prompt_ids + chosen_ids exact by construction.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Optional

import pyarrow as pa

from dpo import schema
from dpo.config import DataConfig
from dpo.errors import UserError
from dpo.model_folders import model_dir, tokenizer_files
from pipeline.formats import RowError, normalise

# Bump when the ids produced for the same text and tokenizer change, or which rows are kept; it is part
# of the reference dataset's fingerprint. 2: a prompt of no tokens is rejected (dpo.schema.EMPTY_PROMPT).
TOKENIZATION_VERSION = "2"

# The dataset's own columns (dpo.schema) and what the stream needs besides: where a row
# belongs, and why it was rejected.
TOKENIZED_SCHEMA = pa.schema(list(schema.PREPARED) + [
    ("file_index", pa.int32()),
    ("shard", pa.string()),
    ("shard_rows", pa.int64()),
    ("reject", pa.string()),
])


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str, trust_remote_code: bool = False, key: str = "model.tokenizer"):
    """The tokenizer in the folder or URI `path`; `key` is the config key that gave it, for messages."""
    from transformers import AutoTokenizer

    path = model_dir(path, key, weights=False)
    tokenizer_files(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}; "
                        "give a folder holding a Hugging Face tokenizer (tokenizer.json, ...)") from None
    if tok.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer at {path} has no EOS token; replies must end with one")
    return tok


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    truncated: bool


def tokenize_pair(pair, tokenizer, data: DataConfig) -> TokenizedPair:
    prompt_ids = tokenizer(pair.prompt, add_special_tokens=not pair.templated)["input_ids"]
    eos = tokenizer.eos_token_id
    replies = [tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] for text in (pair.chosen, pair.rejected)]
    if len(prompt_ids) >= data.max_length:
        raise RowError(
            f"prompt too long: {len(prompt_ids)} tokens leave no room for the reply within "
            f"data.max_length={data.max_length}; raise data.max_length or shorten the prompt"
        )
    try:
        schema.scored_tokens(len(prompt_ids), len(replies[0]))
    except schema.EmptyPrompt as exc:
        raise RowError(str(exc)) from None
    truncated = False
    if len(prompt_ids) > data.max_prompt_length:
        keep = data.max_prompt_length
        prompt_ids = prompt_ids[-keep:] if data.truncation == "keep_end" else prompt_ids[:keep]
        truncated = True
    room = data.max_length - len(prompt_ids)
    for i, ids in enumerate(replies):
        if len(ids) > room:
            replies[i] = ids[:room]  # a reply is read from its start; what is cut is its end (and EOS)
            truncated = True
    return TokenizedPair(prompt_ids, replies[0], replies[1], truncated)


def tokenize_batch(batch: pa.Table, *, data: DataConfig, tokenizer_path: str, trust_remote_code: bool,
                   duplicates=None) -> pa.Table:
    """Ray Data stage: raw rows (pipeline.read.RAW_SCHEMA) -> TOKENIZED_SCHEMA rows.

    `duplicates` maps (file_index, line) to the reason a row repeats an earlier
    pair id; it is computed once over the whole input before this stage runs.
    """
    tokenizer = load_tokenizer(tokenizer_path, trust_remote_code)
    if duplicates is not None and not isinstance(duplicates, dict):
        import ray

        duplicates = ray.get(duplicates)
    out = []
    for row in batch.to_pylist():
        result = dict.fromkeys(TOKENIZED_SCHEMA.names)
        result.update({k: row[k] for k in (schema.PAIR_ID, schema.FILE, "file_index", schema.LINE, "shard",
                                            "shard_rows")})
        reason = row["error"] or (duplicates or {}).get((row["file_index"], row["line"]))
        if reason is None:
            try:
                pair = normalise(json.loads(row["record"]), row["format"], tokenizer)
                tp = tokenize_pair(pair, tokenizer, data)
                result.update({
                    schema.PROMPT_IDS: tp.prompt_ids, schema.CHOSEN_IDS: tp.chosen_ids,
                    schema.REJECTED_IDS: tp.rejected_ids, schema.PROMPT_LENGTH: len(tp.prompt_ids),
                    schema.CHOSEN_LENGTH: len(tp.chosen_ids), schema.REJECTED_LENGTH: len(tp.rejected_ids),
                    schema.TRUNCATED: tp.truncated, schema.IDENTICAL: tp.chosen_ids == tp.rejected_ids,
                })
            except RowError as exc:
                reason = str(exc)
        result["reject"] = reason
        out.append(result)
    return pa.Table.from_pylist(out, schema=TOKENIZED_SCHEMA)


def find_duplicates(ids: list[tuple[Optional[str], int, int, str, bool]]) -> dict:
    """(pair_id, file_index, line, file, id_from_content) rows -> {(file_index, line): reason} for every repeat.

    The first occurrence in input order is kept, so the outcome does not depend
    on the order in which a distributed read delivered the rows.
    """
    first: dict[str, tuple[int, int, str]] = {}
    dupes = {}
    for pair_id, file_index, line, file, from_content in sorted((r for r in ids if r[0] is not None),
                                                                key=lambda r: (r[1], r[2])):
        if pair_id in first:
            f_index, f_line, f_file = first[pair_id]
            dupes[(file_index, line)] = (
                f"duplicate pair: the same prompt, chosen and rejected as {f_file}:{f_line}" if from_content
                else f"duplicate pair id (id {pair_id!r} first seen at {f_file}:{f_line})")
        else:
            first[pair_id] = (file_index, line, file)
    return dupes
