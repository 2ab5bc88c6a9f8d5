"""Generated bad input (hypothesis), through read, validate and tokenize, and the shard writer's counts.

Files of generated rows: any JSON value, any Unicode (lone surrogates through JSON's escapes, NUL, RTL
marks, combining marks, the tokenizer's special tokens as text), empty and huge fields, the three formats
mixed in one file, ids that repeat or have the wrong type, lines that are not JSON, as .jsonl, .json or
.jsonl.gz, whole or cut short. For every file: nothing crashes; every row is kept or rejected with a
reason; rows in = kept + rejected (the manifest's own check); and a kept row's ids are its own text's,
after the chat template and truncation, and decode back to it.

Derandomized (the same examples on every run) with a fixed budget of EXAMPLES per property. A failure
prints the file's name and bytes (`note`), enough to write it again and rerun the pipeline on it.
"""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from dpo.config import DataConfig
from dpo.errors import UserError
from pipeline import manifest as mf
from pipeline.read import RAW_SCHEMA, UnreadableFile, detect_format, read_file_rows
from pipeline.tokenize import find_duplicates, load_tokenizer, tokenize_batch

EXAMPLES = 300
SETTINGS = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
HH = "\n\nAssistant:"
# Lone surrogates (no text: JSON's escapes can still spell them), NUL, RTL and LTR marks, a right-to-left
# override, combining marks, a BOM, a replacement character, CJK and an emoji, and text that spells the
# tokenizer's special tokens.
SPECIAL = ["\ud800", "\udfff", "\x00", "\u200f", "\u200e", "\u202e", "\u0301", "\u0308", "\ufeff", "\ufffd", "語",
           "🙂", "<|endoftext|>", "<|im_start|>", "<|im_end|>", HH, "\n", " "]
DATA = DataConfig(max_length=48, max_prompt_length=24, shard_rows=4)


def texts(max_size: int = 24) -> st.SearchStrategy[str]:
    """Any Unicode, lone surrogates included (no category excluded), with the special pieces often."""
    return st.lists(st.one_of(st.characters(exclude_categories=()), st.sampled_from(SPECIAL)),
                    max_size=max_size).map("".join)


huge = st.builds(lambda piece, n: piece * n, st.sampled_from(["a", "語", " hello", HH]), st.integers(200, 3000))
field = st.one_of(texts(), texts(), huge, st.just(""))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | texts(8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts(6), inner, max_size=3), max_leaves=8)
ids = st.one_of(st.sampled_from(["a", "b", 1, 2]), json_values)


def message(roles=("user", "assistant", "system")):
    return st.fixed_dictionaries({"role": st.sampled_from(roles), "content": field})


# Usable text: no lone surrogate, and something besides whitespace.
good = st.lists(st.one_of(st.characters(exclude_categories=("Cs",)), st.sampled_from(SPECIAL[2:])),
                min_size=1, max_size=24).map("".join).filter(str.strip)
good_explicit = st.fixed_dictionaries({"prompt": good, "chosen": good, "rejected": good})
good_implicit = st.builds(lambda p, c, r: {"chosen": p + HH + c, "rejected": p + HH + r}, good, good, good)
good_conversational = st.builds(
    lambda u, c, r: {"prompt": [{"role": "user", "content": u}], "chosen": [{"role": "assistant", "content": c}],
                     "rejected": [{"role": "assistant", "content": r}]}, good, good, good)
explicit = st.fixed_dictionaries({"prompt": field, "chosen": field, "rejected": field}, optional={"id": ids})
implicit = st.builds(lambda p, c, r: {"chosen": p + HH + c, "rejected": p + HH + r}, field, field, field)
conversational = st.fixed_dictionaries(
    {"prompt": st.lists(message(), min_size=1, max_size=2), "chosen": st.lists(message(), min_size=1, max_size=2),
     "rejected": st.lists(message(), min_size=1, max_size=2)}, optional={"id": ids})
# A record with any keys the formats know (or not), holding any JSON values.
loose = st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "id", "other"]), json_values, max_size=4)
rows = st.one_of(good_explicit, good_implicit, good_conversational, explicit, implicit, conversational, loose,
                 json_values)


def as_lines(records: st.SearchStrategy) -> st.SearchStrategy[list[bytes]]:
    """JSON lines of `records`, ASCII (surrogates as \\ud800 escapes) or UTF-8 (lone surrogates as the bytes
    that are no UTF-8), among lines of any bytes and blank ones."""
    return st.lists(st.one_of(records.map(lambda r: json.dumps(r).encode()),
                              records.map(lambda r: json.dumps(r, ensure_ascii=False).encode("utf-8", "surrogatepass")),
                              st.binary(max_size=12), st.just(b"")), max_size=12)


# Files of mixed rows, and files of one format's usable rows (with the odd bad line).
lines = st.one_of(as_lines(rows), *(as_lines(kind) for kind in (good_explicit, good_implicit, good_conversational)))


def pipeline_rows(path: str, tokenizer: str) -> tuple[list[dict], dict]:
    """The rows of one file after read, validate and tokenize, and the manifest the shard writer and
    finalize make of them: the precompute's stage without Ray (pipeline.stage) and without scores."""
    try:
        read = [row for shard in read_file_rows(path, 0, fmt="auto", shard_rows=DATA.shard_rows) for row in shard]
    except UnreadableFile as exc:
        read, file_rejects = [], [{"file": path, "line": None, "pair_id": None, "reason": f"unreadable file: {exc}"}]
    else:
        file_rejects = []
    dupes = find_duplicates([(r["pair_id"], r["file_index"], r["line"], r["file"], r["id_from_content"])
                             for r in read if r["error"] is None])
    out = tokenize_batch(pa.Table.from_pylist(read, schema=RAW_SCHEMA), data=DATA, tokenizer_path=tokenizer,
                         trust_remote_code=False, duplicates=dupes).to_pylist() if read else []
    folder = os.path.join(os.path.dirname(path), "out")
    shard_sizes = {r["shard"]: r["shard_rows"] for r in read}
    writer = mf.ShardWriter(folder, shard_sizes, scored=False)
    for shard in shard_sizes:
        writer.add(pa.Table.from_pylist([r for r in out if r["shard"] == shard]))
    assert writer.incomplete() == {}
    try:
        manifest = mf.finalize(folder, shard_sizes, file_rejects, {})
    except UserError as exc:
        assert str(exc).startswith("no usable pairs"), exc
        manifest = json.loads(open(os.path.join(folder, mf.MANIFEST)).read())
    return out, manifest


def expected_texts(record: dict, fmt: str, tok) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as text, by the README's definition of each format."""
    if fmt == "explicit":
        return record["prompt"], record["chosen"], record["rejected"]
    if fmt == "implicit":
        cut = record["chosen"].rfind(HH) + len(HH)
        return record["chosen"][:cut], record["chosen"][cut:], record["rejected"][cut:]
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        messages = record["prompt"]
    else:  # the shared leading messages
        shared = next(i for i, (c, r) in enumerate(zip(chosen + [None], rejected + [None])) if c != r)
        messages, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return (prompt, *(tok.apply_chat_template(messages + reply, tokenize=False)[len(prompt):]
                      for reply in (chosen, rejected)))


def check_kept(row: dict, record: dict, fmt: str, tok) -> None:
    """The kept row's ids are its text's tokens, cut as data.max_prompt_length (keep_end) and data.max_length
    say, each reply ending with EOS unless cut; what is not cut decodes back to its text."""
    prompt, chosen, rejected = expected_texts(record, fmt, tok)
    full_prompt = tok(prompt, add_special_tokens=False)["input_ids"]
    n = len(row["prompt_ids"])
    assert 0 < n <= DATA.max_prompt_length and row["prompt_ids"] == full_prompt[len(full_prompt) - n:]
    assert (n == len(full_prompt)) == (len(full_prompt) <= DATA.max_prompt_length)
    cut = n < len(full_prompt)
    if not cut:
        assert tok.decode(row["prompt_ids"]) == prompt
    for text, ids in ((chosen, row["chosen_ids"]), (rejected, row["rejected_ids"])):
        full = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == full[:len(ids)] and len(ids) == min(len(full), DATA.max_length - n)
        if len(ids) == len(full):
            assert tok.decode(ids[:-1]) == text
        cut |= len(ids) < len(full)
    assert row["truncated"] == cut


def check_file(path: str, data: bytes, tokenizer: str, records: dict[int, dict]) -> dict:
    """Run one file through and check the properties; `records` maps a line to the record written there."""
    note(f"file {os.path.basename(path)}: {data!r}")
    tok = load_tokenizer(tokenizer)
    out, manifest = pipeline_rows(path, tokenizer)
    counts = manifest["counts"]
    assert counts["read"] == len(out) == counts["kept"] + counts["rejected"]
    assert len({r["line"] for r in out}) == len(out)
    rejects = [json.loads(line) for line in open(os.path.join(os.path.dirname(path), "out", mf.REJECTS))]
    assert len(rejects) == counts["rejected"] + counts["unreadable_files"]
    assert all(isinstance(r["reason"], str) and r["reason"] for r in rejects)
    for row in out:
        if row["reject"] is None:
            check_kept(row, records[row["line"]], row_format(records, row["line"]), tok)
        else:
            assert row["prompt_ids"] is None and row["reject"].strip()
    return counts


def row_format(records: dict[int, dict], line: int) -> str:
    """The format `auto` gives a file: that of its first object with a format (pipeline.read.detect_format)."""
    return next(f for f in (detect_format(r) for _, r in sorted(records.items())) if f is not None)


def parsed(line: bytes):
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> str:
    return tiny_model


@SETTINGS
@given(lines=lines, gz=st.booleans())
def test_every_generated_jsonl_row_is_kept_right_or_rejected_with_a_reason(tmp_path_factory, tokenizer, lines, gz):
    """Intact .jsonl and .jsonl.gz files: rows in are the non-blank lines, each one row out."""
    folder = tmp_path_factory.mktemp("gen")
    data = b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines)
    path = str(folder / ("in.jsonl.gz" if gz else "in.jsonl"))
    with open(path, "wb") as fh:
        fh.write(gzip.compress(data, mtime=0) if gz else data)
    numbered = [(i, line.replace(b"\n", b" ")) for i, line in enumerate(lines, start=1)]
    records = {i: parsed(line) for i, line in numbered if parsed(line) is not None}
    counts = check_file(path, data, tokenizer, records)
    assert counts["read"] == sum(1 for _, line in numbered if line.strip())


@SETTINGS
@given(records=st.lists(rows, max_size=8), cut=st.floats(0, 1), as_json=st.booleans())
def test_cut_gzip_and_json_documents_are_answered_never_a_crash(tmp_path_factory, tokenizer, records, cut,
                                                                 as_json):
    """A .jsonl.gz cut short answers its whole lines and one reject for the rest; a .json document (a list
    of rows) answers each element, or the whole file when it is no list."""
    folder = tmp_path_factory.mktemp("gen")
    if as_json:
        data = json.dumps(records).encode()
        path = str(folder / "in.json")
        with open(path, "wb") as fh:
            fh.write(data)
        lines = {i: r for i, r in enumerate(records, start=1) if isinstance(r, dict)}
        counts = check_file(path, data, tokenizer, lines)
        assert counts["read"] == len(records)
        return
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in records), mtime=0)
    data = whole[:int(cut * len(whole))]
    path = str(folder / "in.jsonl.gz")
    with open(path, "wb") as fh:
        fh.write(data)
    lines = {i: r for i, r in enumerate(records, start=1) if isinstance(r, dict)}
    counts = check_file(path, data, tokenizer, lines)
    assert counts["read"] + counts["unreadable_files"] <= len(records) + 1
