"""Promise: whatever is wrong with a row or a file, every good row still comes out, every bad row is in
rejects.jsonl with its file, line and reason, and rows in = kept + rejected. A file that cannot be read
at all is one clear error naming it, or, with data.on_unreadable_file=skip, one line in rejects.jsonl."""

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo.config import load_config
from dpo.errors import UserError
from dpo.fingerprint import read_manifest
from dpo.storage import read_parquet_files
from pipeline.prepare import prepare
from pipeline.read import MAX_LINE_BYTES
from wordlevel import save_wordlevel

GOOD = {"prompt": "what is 2 + 2 ?", "chosen": "4", "rejected": "5"}
USER = {"role": "user", "content": "hi"}


def good(i):
    return {**GOOD, "id": f"good-{i}"}


pytestmark = pytest.mark.usefixtures("ray_session")


# (file name, line, row, the start of the reason it must be rejected with); None = kept.
MIXED_JSONL = [
    (good(1), None),
    ('{"prompt": "hi", "chosen": "4"', "bad JSON"),                                               # 1
    ({"prompt": "hi", "chosen": None, "rejected": "5", "id": "n"}, "field 'chosen' is null"),     # 2
    ({"prompt": "hi", "chosen": 5, "rejected": "5", "id": "t"}, "field 'chosen' must be a string"),  # 3
    ({"prompt": "hi", "chosen": "", "rejected": "5", "id": "e"}, "empty chosen reply"),           # 4
    ({"prompt": "hi", "chosen": "4", "rejected": "4", "id": "same"}, None),                       # 5 kept, counted
    ({"prompt": "hi " * 80, "chosen": "4", "rejected": "5", "id": "long"}, "prompt too long"),    # 6
    (good(1), "duplicate pair id"),                                                               # 7
    ('[1, 2, 3]', "row is a JSON list, not an object"),                                           # 8
    ({"prompt": "hi", "rejected": "5", "id": "m"}, "missing field 'chosen'"),                     # 9
    ({**GOOD, "id": ["x"]}, "field 'id' must be a string or an integer"),                         # 10
    (good(2), None),
]
CHAT_JSONL = [
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}], "id": "chat-ok"}, None),
    ({"prompt": [{"content": "hi"}], "chosen": [{"role": "assistant", "content": "4"}],
      "rejected": [{"role": "assistant", "content": "5"}], "id": "c1"}, "message 1 of 'prompt' has no string 'role'"),  # 11
    ({"prompt": [USER], "chosen": [{"role": "assistant", "content": " "}],
      "rejected": [{"role": "assistant", "content": "5"}], "id": "c2"}, "empty chosen reply"),
]
HH_JSONL = [
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}, None),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: bye\n\nAssistant: bye"},
     "chosen and rejected transcripts differ"),                                                   # 12
]


def write(path, cases, extra: bytes = b""):
    with open(path, "wb") as fh:
        for row, _ in cases:
            fh.write((row if isinstance(row, str) else json.dumps(row)).encode() + b"\n")
        fh.write(extra)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    files = {}
    non_utf8 = b'{"prompt": "caf\xe9", "chosen": "4", "rejected": "5"}\n'                                # 13
    huge = b'{"prompt": "' + b"x" * (MAX_LINE_BYTES + 10) + b'", "chosen": "4", "rejected": "5"}\n'    # 14
    files["mixed.jsonl"] = write(d / "mixed.jsonl", MIXED_JSONL, non_utf8 + huge + json.dumps(good(3)).encode() + b"\n")
    files["chat.jsonl"] = write(d / "chat.jsonl", CHAT_JSONL)
    files["hh.jsonl"] = write(d / "hh.jsonl", HH_JSONL)
    # 15: a parquet file whose columns are not a preference pair at all.
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), d / "schema.parquet")
    files["schema.parquet"] = d / "schema.parquet"
    # 16: a gzip stream cut short: the lines before the cut come out, the cut is one reject.
    blob = gzip.compress("".join(json.dumps(good(100 + i)) + "\n" for i in range(400)).encode())
    (d / "cut.jsonl.gz").write_bytes(blob[: len(blob) - 40])
    files["cut.jsonl.gz"] = d / "cut.jsonl.gz"
    # 17: a parquet file cut short cannot be read at all (its footer is gone).
    pq.write_table(pa.Table.from_pylist([good(200), good(201)]), d / "full.parquet")
    raw = (d / "full.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    os.remove(d / "full.parquet")
    files["cut.parquet"] = d / "cut.parquet"
    return d, files


def run(tmp_path, files, tok_dir, **data):
    overrides = [f"run.output_dir={tmp_path / 'run'}", f"model.policy={tok_dir}",
                 f"data.train_files={json.dumps([str(f) for f in files])}", "data.max_length=64",
                 "data.max_prompt_length=32", "data.shard_rows=5"] + [f"data.{k}={v}" for k, v in data.items()]
    cfg = load_config(None, overrides)
    return cfg, prepare(cfg)


def test_corpus_of_bad_rows_and_files(tmp_path, corpus):
    d, files = corpus
    tok_dir = save_wordlevel(tmp_path / "tok")
    cfg, manifest = run(tmp_path, list(files.values()), tok_dir, on_unreadable_file="skip")
    folder = os.path.join(cfg.run.output_dir, "prepared")
    kept = read_parquet_files(folder, manifest["files"]).to_pylist()
    rejects = [json.loads(x) for x in open(os.path.join(folder, "rejects.jsonl"))]
    by_pos = {(os.path.basename(r["file"]), r["line"]): r["reason"] for r in rejects}
    kept_pos = {(os.path.basename(r["file"]), r["line"]) for r in kept}

    for name, cases in (("mixed.jsonl", MIXED_JSONL), ("chat.jsonl", CHAT_JSONL), ("hh.jsonl", HH_JSONL)):
        for line, (_, reason) in enumerate(cases, start=1):
            if reason is None:
                assert (name, line) in kept_pos, (name, line)
            else:
                assert by_pos[(name, line)].startswith(reason), (name, line, by_pos.get((name, line)))
    n = len(MIXED_JSONL)
    assert by_pos[("mixed.jsonl", n + 1)].startswith("not valid UTF-8")
    assert by_pos[("mixed.jsonl", n + 2)].endswith(f"bytes, over the {MAX_LINE_BYTES}-byte limit")
    assert ("mixed.jsonl", n + 3) in kept_pos
    assert by_pos[("schema.parquet", 1)].startswith("cannot tell the row's format")

    cut_kept = sorted(line for name, line in kept_pos if name == "cut.jsonl.gz")
    cut_rejects = [(line, r) for (name, line), r in by_pos.items() if name == "cut.jsonl.gz"]
    assert len(cut_rejects) == 1 and cut_rejects[0][1].startswith("file is truncated or corrupt after line")
    assert cut_kept == list(range(1, cut_rejects[0][0])) and len(cut_kept) > 300

    assert by_pos[("cut.parquet", None)].startswith("unreadable file: not a readable Parquet file")

    identical = [r for r in kept if r["pair_id"] == "same"]
    assert len(identical) == 1 and identical[0]["identical"]

    c = manifest["counts"]
    assert c["read"] == c["kept"] + c["rejected"] == len(kept) + len(rejects) - 1
    assert c["unreadable_files"] == 1 and c["identical"] == 1
    assert c["rejected_by_reason"]["bad JSON"] == 1
    assert sum(c["rejected_by_reason"].values()) == len(rejects)
    assert read_manifest(folder)["counts"] == c


def test_unreadable_file_is_one_clear_error_by_default(tmp_path, corpus):
    d, files = corpus
    tok_dir = save_wordlevel(tmp_path / "tok")
    with pytest.raises(UserError) as err:
        run(tmp_path, [files["mixed.jsonl"], files["cut.parquet"]], tok_dir)
    message = str(err.value)
    assert message.startswith(f"{files['cut.parquet']}: not a readable Parquet file")
    assert "data.on_unreadable_file=skip" in message
    assert not os.path.exists(os.path.join(tmp_path, "run", "prepared", "_manifest.json"))
