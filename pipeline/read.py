"""Tolerant readers: every input row comes out once, as a record or as an error.

Ray Data's `read_json` fails a whole file on one malformed line, and its block
boundaries say nothing about where a row came from. These readers run inside
Ray Data tasks (one task per file, streaming), keep the file and line of every
row, and turn each unusable line into a row that carries its reason, so that
rows in = kept + rejected holds from the very first stage.

Rows are grouped into deterministic shards (`{file_index:04d}-{chunk:06d}`,
`data.shard_rows` input rows each): the unit of output files and of resume.
"""

from __future__ import annotations

import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dpo.errors import UserError
from dpo.storage import check_uri, is_uri, resolve

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
# A line this long cannot fit any sane max_length; refusing it early keeps a
# corrupt file from taking a worker's memory.
MAX_LINE_BYTES = 16 * 1024 * 1024

RAW_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("file_index", pa.int32()),
        ("line", pa.int64()),
        ("shard", pa.string()),
        ("shard_rows", pa.int64()),
        ("pair_id", pa.string()),
        # True where the row has no `id` and pair_id is a hash of its content
        ("id_from_content", pa.bool_()),
        ("format", pa.string()),
        ("record", pa.string()),
        ("error", pa.string()),
    ]
)


class UnreadableFile(UserError):
    pass


def expand_inputs(paths: list[str], key: str = "data.train_files") -> list[str]:
    """Globs and folders become sorted file lists; a missing path is the user's mistake."""
    if not paths:
        raise UserError(f"{key} is empty; list at least one .jsonl, .jsonl.gz, .json or .parquet file")
    out: list[str] = []
    for path in paths:
        if is_uri(path):
            check_uri(path, key)
            fs, p = resolve(path)
            scheme = path.split("://", 1)[0]
            if _is_glob(p):
                out += _uri_matches(fs, scheme, p, path, key)
                continue
            info = fs.get_file_info(p)
            if info.type == pafs.FileType.NotFound:
                raise UserError(f"{key}: {path} does not exist; check the path")
            if info.type == pafs.FileType.Directory:
                infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
                out += sorted(f"{scheme}://{i.path}" for i in infos if i.path.endswith(SUFFIXES))
            else:
                out.append(path)
            continue
        if _is_glob(path):
            matches = sorted(glob.glob(path))
            if not matches:
                raise UserError(f"{key}: the pattern {path} matches no file; check the path")
            out += matches
        elif os.path.isdir(path):
            found = sorted(
                os.path.join(root, f) for root, _, files in os.walk(path) for f in files if f.endswith(SUFFIXES)
            )
            if not found:
                raise UserError(f"{key}: the folder {path} holds no .jsonl/.jsonl.gz/.json/.parquet file")
            out += found
        elif os.path.exists(path):
            out.append(path)
        else:
            raise UserError(f"{key}: {path} does not exist; check the path")
    for path in out:
        if not path.endswith(SUFFIXES):
            raise UserError(f"{key}: {path} is not .jsonl, .jsonl.gz, .json or .parquet; convert it or rename it")
    return [p if is_uri(p) else os.path.abspath(p) for p in out]


def _is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _uri_matches(fs, scheme: str, pattern: str, uri: str, key: str) -> list[str]:
    """The files of an object store matching a glob, sorted: the folder before the first wildcard, listed."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if _is_glob(part))
    base = "/".join(parts[:fixed])
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    found = sorted(f"{scheme}://{i.path}" for i in infos
                   if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, pattern))
    if not found:
        raise UserError(f"{key}: the pattern {uri} matches no file; check the path")
    return found


# --------------------------------------------------------------------------- records


def detect_format(record: dict) -> Optional[str]:
    chosen, prompt = record.get("chosen"), record.get("prompt")
    if isinstance(chosen, list) or isinstance(prompt, list):
        return "conversational"
    if "prompt" in record:
        return "explicit"
    if "chosen" in record:
        return "implicit"
    return None


def has_own_id(record: dict) -> bool:
    return record.get("id") is not None


def pair_id_of(record: dict) -> tuple[Optional[str], Optional[str]]:
    """(pair_id, error). An explicit `id` wins; otherwise a hash of the pair's content."""
    if has_own_id(record):
        value = record["id"]
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None, f"field 'id' must be a string or an integer, got {type(value).__name__}"
        return str(value), None
    content = {k: record.get(k) for k in ("prompt", "chosen", "rejected")}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return digest[:24], None


def _parse_line(raw: bytes) -> tuple[Optional[dict], Optional[str]]:
    if len(raw) > MAX_LINE_BYTES:
        return None, f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not valid UTF-8 (byte {exc.start})"
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"bad JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(obj, dict):
        return None, f"row is a JSON {type(obj).__name__}, not an object"
    return obj, None


def _jsonl_records(stream, gz: bool) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    reader = gzip.GzipFile(fileobj=stream) if gz else stream
    line_no = 0
    while True:
        try:
            raw = reader.readline(MAX_LINE_BYTES + 1)
        except (EOFError, OSError, zlib.error) as exc:
            yield line_no + 1, None, f"file is truncated or corrupt after line {line_no}: {exc}"
            return
        if not raw:
            return
        line_no += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            # Skip the rest of the oversized line without holding it.
            size = len(raw)
            while raw and not raw.endswith(b"\n"):
                raw = reader.readline(MAX_LINE_BYTES)
                size += len(raw)
            yield line_no, None, f"line is {size} bytes, over the {MAX_LINE_BYTES}-byte limit"
            continue
        if not raw.strip():
            continue  # a blank line is not a row
        record, error = _parse_line(raw.rstrip(b"\r\n"))
        yield line_no, record, error


def _json_records(stream) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    try:
        data = json.loads(stream.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableFile(f"not a JSON document: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise UnreadableFile("a .json file must hold a list of pair objects; use .jsonl for one object per line")
    for i, obj in enumerate(data, start=1):
        if isinstance(obj, dict):
            yield i, obj, None
        else:
            yield i, None, f"row is a JSON {type(obj).__name__}, not an object"


def _parquet_records(stream) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    try:
        pf = pq.ParquetFile(pa.BufferReader(stream.read()))
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnreadableFile(f"not a readable Parquet file: {exc}") from None
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for obj in batch.to_pylist():
            i += 1
            yield i, obj, None


def iter_records(path: str) -> Iterator[tuple[int, Optional[dict], Optional[str]]]:
    """(line, record, error) for every row of one file, in file order."""
    fs, p = resolve(path)
    try:
        stream = fs.open_input_stream(p, compression=None)
    except (OSError, pa.ArrowInvalid) as exc:
        raise UnreadableFile(f"cannot open: {exc}") from None
    with stream:
        if path.endswith(".parquet"):
            yield from _parquet_records(stream)
        elif path.endswith(".json"):
            yield from _json_records(stream)
        else:
            if path.endswith(".gz"):
                head = stream.read(2)
                if head != b"\x1f\x8b":
                    raise UnreadableFile("has a .gz name but is not gzip data")
                stream = io.BufferedReader(_Prefixed(head, stream))
                yield from _jsonl_records(stream, gz=True)
            else:
                yield from _jsonl_records(io.BufferedReader(_Prefixed(b"", stream)), gz=False)


class _Prefixed(io.RawIOBase):
    """A raw stream that replays bytes already read (the gzip magic) before the rest."""

    def __init__(self, head: bytes, stream):
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if self._head:
            n = min(len(buf), len(self._head))
            buf[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._stream.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def shard_of(file_index: int, line: int, shard_rows: int) -> str:
    return f"{file_index:04d}-{(line - 1) // shard_rows:06d}"


def read_file_rows(
    path: str, file_index: int, *, fmt: str, shard_rows: int, skip_shards: frozenset = frozenset(),
    ids_only: bool = False,
) -> Iterator[list[dict]]:
    """Yield the rows of one file, one list per shard.

    The file's format is detected once, on its first usable record, when `fmt` is
    auto. Shards in `skip_shards` are parsed (detection must not depend on what is
    skipped) but not emitted. With `ids_only`, rows leave out the record text.
    """
    detected = None if fmt == "auto" else fmt
    chunk: list[dict] = []
    current = None

    def flush():
        for row in chunk:
            row["shard_rows"] = len(chunk)
        return chunk

    for line, record, error in iter_records(path):
        shard = shard_of(file_index, line, shard_rows)
        if shard != current:
            if chunk and current not in skip_shards:
                yield flush()
            chunk, current = [], shard
        pair_id = text = None
        if record is not None:
            if detected is None:
                detected = detect_format(record)
            try:
                # A lone surrogate (JSON's "\ud800") is no text: it cannot be hashed, stored or tokenized.
                text = json.dumps(record, ensure_ascii=False)
                text.encode("utf-8")
            except (TypeError, ValueError) as exc:  # UnicodeEncodeError is a ValueError
                text, error = None, f"row holds a value that is not JSON text: {exc}"
            else:
                pair_id, error = pair_id_of(record)
            if error or ids_only:
                text = None
        chunk.append(
            {
                "file": path,
                "file_index": file_index,
                "line": line,
                "shard": shard,
                "pair_id": pair_id,
                "id_from_content": None if record is None else not has_own_id(record),
                "format": detected,
                "record": text,
                "error": error,
            }
        )
    if chunk and current not in skip_shards:
        yield flush()
