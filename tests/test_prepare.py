"""The prepare stage end to end on Ray Data: files in, prepared/ out, every row accounted for."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpo import schema
from dpo.batching import Pairs
from dpo.config import load_config
from dpo.errors import UserError
from dpo.fingerprint import read_manifest
from dpo.storage import read_parquet_files
from dpo.launch import DatasetFolder, read_pairs
from pipeline.prepare import prepare
from conftest import HH_TEST as HH, require_hh
from wordlevel import save_wordlevel

ROOT = Path(__file__).resolve().parents[1]
EXPLICIT = {"prompt": "what is 2 + 2 ?", "chosen": "4", "rejected": "5"}
EXPLICIT_IDS = ([9, 10, 11, 12, 11, 15], [13, 1], [14, 1])


pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return save_wordlevel(tmp_path_factory.mktemp("wordlevel"))


def config(tmp_path, files, tok_dir, **data):
    overrides = [f"run.output_dir={tmp_path / 'run'}", f"model.policy={tok_dir}",
                 f"data.train_files={json.dumps([str(f) for f in files])}", "data.max_length=64",
                 "data.max_prompt_length=32"] + [f"data.{k}={v}" for k, v in data.items()]
    return load_config(None, overrides)


def write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


def rows_by_file(cfg, kind="prepared"):
    folder = os.path.join(cfg.run.output_dir, kind)
    manifest = read_manifest(folder)
    table = read_parquet_files(folder, manifest["files"])
    out = {}
    for row in table.to_pylist():
        out.setdefault(os.path.basename(row["file"]), {})[row["line"]] = row
    rejects = [json.loads(x) for x in open(os.path.join(folder, "rejects.jsonl"))]
    return manifest, out, rejects


def test_every_file_type_and_format(tmp_path, tok_dir):
    """The same explicit pair from .jsonl, .jsonl.gz, .json and .parquet gives the same hand-checked ids
    (see test_formats: prompt [9, 10, 11, 12, 11, 15], replies [13, 1] and [14, 1]); implicit and
    conversational files are detected per file."""
    files = [write_jsonl(tmp_path / "a.jsonl", [{**EXPLICIT, "id": "a"}])]
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({**EXPLICIT, "id": "b"}) + "\n")
    files.append(tmp_path / "b.jsonl.gz")
    (tmp_path / "c.json").write_text(json.dumps([{**EXPLICIT, "id": "c"}]))
    files.append(tmp_path / "c.json")
    pq.write_table(pa.Table.from_pylist([{**EXPLICIT, "id": "d"}]), tmp_path / "d.parquet")
    files.append(tmp_path / "d.parquet")
    files.append(write_jsonl(tmp_path / "e.jsonl", [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: bye"}]))
    files.append(write_jsonl(tmp_path / "f.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "4"}],
         "rejected": [{"role": "assistant", "content": "5"}]}]))
    cfg = config(tmp_path, files, tok_dir)
    prepare(cfg)
    manifest, rows, rejects = rows_by_file(cfg)
    assert manifest["counts"]["read"] == 6 and manifest["counts"]["kept"] == 6 and rejects == []
    for name in ("a.jsonl", "b.jsonl.gz", "c.json", "d.parquet"):
        row = rows[name][1]
        assert (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) == EXPLICIT_IDS, name
    hh = rows["e.jsonl"][1]
    assert (hh["prompt_ids"], hh["chosen_ids"], hh["rejected_ids"]) == ([3, 4, 6, 5, 4], [7, 1], [8, 1])
    chat = rows["f.jsonl"][1]
    assert (chat["prompt_ids"], chat["chosen_ids"]) == ([16, 18, 6, 17, 16, 19], [13, 17, 1])
    # What the writer wrote is dpo.schema's prepared layout, and what reference-free training reads.
    folder = os.path.join(cfg.run.output_dir, "prepared")
    for name in manifest["files"]:
        assert pq.read_schema(os.path.join(folder, name)).remove_metadata().equals(schema.PREPARED), name
    pairs = Pairs.from_batch(read_pairs(DatasetFolder(folder, manifest)))
    assert pairs.ref_chosen is None
    by_id = {row["pair_id"]: row for file_rows in rows.values() for row in file_rows.values()}
    assert sorted(by_id) == list(pairs.pair_ids)
    for i, pair_id in enumerate(pairs.pair_ids):
        assert (pairs.prompt[i].tolist(), pairs.chosen[i].tolist(), pairs.rejected[i].tolist()) == (
            by_id[pair_id]["prompt_ids"], by_id[pair_id]["chosen_ids"], by_id[pair_id]["rejected_ids"])
    # The resolved config is saved beside the output and loads back to the same settings.
    saved = load_config(os.path.join(cfg.run.output_dir, "prepared", "config.yaml"))
    assert saved == cfg


def test_malformed_line_costs_that_line_only(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "x.jsonl", [{**EXPLICIT, "id": "a"}, '{"prompt": "hi", "chosen": ', {**EXPLICIT, "id": "b"}])
    cfg = config(tmp_path, [f], tok_dir)
    prepare(cfg)
    manifest, rows, rejects = rows_by_file(cfg)
    assert sorted(rows["x.jsonl"]) == [1, 3]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rejects] == [(2, "bad JSON")]
    assert rejects[0]["file"] == str(f)


def test_a_repeated_pair_without_id_is_rejected_as_a_duplicate(tmp_path, tok_dir):
    """Without an `id`, the pair id is a hash of prompt, chosen and rejected: an exact repeat, in another
    file and with its keys in another order, is rejected with a reason that names the row it repeats."""
    a = write_jsonl(tmp_path / "a.jsonl", [EXPLICIT, {**EXPLICIT, "rejected": "6"}])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(reversed(list(EXPLICIT.items())))])
    cfg = config(tmp_path, [a, b], tok_dir)
    prepare(cfg)
    manifest, rows, rejects = rows_by_file(cfg)
    assert sorted(rows["a.jsonl"]) == [1, 2] and "b.jsonl" not in rows
    assert [(os.path.basename(r["file"]), r["line"], r["reason"]) for r in rejects] == [
        ("b.jsonl", 1, f"duplicate pair: the same prompt, chosen and rejected as {a}:1")]
    assert manifest["counts"]["read"] == 3 == manifest["counts"]["kept"] + manifest["counts"]["rejected"]


def test_bad_rows_are_rejected_with_reasons_and_counts_reconcile(tmp_path, tok_dir):
    lines = [
        {**EXPLICIT, "id": 1},
        {**EXPLICIT, "id": 2, "chosen": ["4"]},                        # wrong field type
        {**EXPLICIT, "id": 1},                                         # duplicate id
        {**EXPLICIT, "id": 3, "prompt": " ".join(["hi"] * 70)},        # no room for the reply
        {**EXPLICIT, "id": 4, "rejected": ""},                         # empty reply
        {**EXPLICIT, "id": 5, "rejected": "4"},                        # identical replies: kept, counted
    ]
    f = write_jsonl(tmp_path / "bad.jsonl", lines)
    with open(f, "ab") as fh:
        fh.write(b'{"prompt": "caf\xe9", "chosen": "4", "rejected": "5"}\n')  # latin-1, not UTF-8
    cfg = config(tmp_path, [f], tok_dir)
    prepare(cfg)
    manifest, rows, rejects = rows_by_file(cfg)
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert sorted(rows["bad.jsonl"]) == [1, 6]
    assert reasons[2] == "field 'chosen' must be a string, got list"
    assert reasons[3].startswith("duplicate pair id (id '1' first seen at") and reasons[3].endswith("bad.jsonl:1)")
    assert reasons[4].startswith("prompt too long: 70 tokens leave no room")
    assert reasons[5] == "empty rejected reply"
    assert reasons[7].startswith("not valid UTF-8")
    c = manifest["counts"]
    assert (c["read"], c["kept"], c["rejected"], c["identical"]) == (7, 2, 5, 1)
    assert c["read"] == c["kept"] + c["rejected"]


def test_pair_ids_are_stable_across_runs(tmp_path, tok_dir):
    f = write_jsonl(tmp_path / "p.jsonl", [EXPLICIT, {**EXPLICIT, "chosen": "hello"}])
    ids = []
    for name in ("one", "two"):
        cfg = config(tmp_path / name, [f], tok_dir)
        prepare(cfg)
        ids.append(sorted(r["pair_id"] for r in rows_by_file(cfg)[1]["p.jsonl"].values()))
    assert ids[0] == ids[1] and len(set(ids[0])) == 2


@pytest.mark.parametrize("problem", ["missing", "empty", "unusable", "not_gzip"])
def test_unusable_inputs_are_one_clear_error(tmp_path, tok_dir, problem):
    f = tmp_path / "in.jsonl"
    if problem == "empty":
        f.write_text("")
        expected = "input files are empty"
    elif problem == "unusable":
        write_jsonl(f, [{"prompt": "hi"}, "not json"])
        expected = "no usable pairs: all 2 input rows were rejected"
    elif problem == "not_gzip":
        f = tmp_path / "in.jsonl.gz"
        f.write_text(json.dumps(EXPLICIT))
        expected = "in.jsonl.gz: has a .gz name but is not gzip data"
    else:
        expected = "does not exist"
    with pytest.raises(UserError, match=expected):
        prepare(config(tmp_path, [f], tok_dir))


def test_real_hh_pairs(tmp_path):
    """2,312 real HH-RLHF pairs: 5 whose transcripts differ before the last reply and 4 with an empty
    reply are rejected; every kept, untruncated pair decodes back to its chosen transcript plus EOS."""
    require_hh()
    from pipeline.models import train_tokenizer

    rows = [json.loads(x) for x in gzip.open(HH, "rt", encoding="utf-8")]
    train_tokenizer((r["chosen"] for r in rows[:200]), tmp_path / "tok", vocab_size=1024)
    cfg = config(tmp_path, [HH], tmp_path / "tok", max_length=8192, max_prompt_length=8000)
    prepare(cfg)
    manifest, by_file, rejects = rows_by_file(cfg)
    c = manifest["counts"]
    assert c["read"] == 2312 and c["kept"] + c["rejected"] == 2312
    assert c["rejected_by_reason"] == {"chosen and rejected transcripts differ before the last Assistant reply": 5,
                                       "empty chosen reply": 4}
    assert sorted(r["line"] for r in rejects if "empty" in r["reason"]) == [87, 517, 926, 1104]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    kept = by_file[HH.name]
    checked = 0
    for line, row in kept.items():
        if row["truncated"]:
            continue
        text = tok.decode(row["prompt_ids"] + row["chosen_ids"], skip_special_tokens=False)
        assert text == rows[line - 1]["chosen"] + tok.eos_token, line
        checked += 1
    assert checked == c["kept"] - c["truncated"] and checked > 2200


@pytest.mark.parametrize("override, message", [
    ("train.bogus=1", "unknown config key 'train.bogus'"),
    ("train.num_workers=two", "config key 'train.num_workers': input should be a valid integer"),
    ("data.truncation=middle", "config key 'data.truncation'"),
])
def test_config_mistakes_exit_with_one_clear_line(tmp_path, override, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {output_dir: x}\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", "--config", str(cfg), override],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
