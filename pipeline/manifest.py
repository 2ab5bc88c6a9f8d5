"""Shard files, their completion markers, and the manifest that is written last.

A dataset folder (prepared/ or reference/) holds:

    part-{shard}.parquet   kept rows of one input shard, sorted by line
    _shards/{shard}.json   the shard's marker: counts and its rejected rows;
                           written after its Parquet file, so a marker means done
    _progress.json         the fingerprint of the run filling the folder
    rejects.jsonl          every rejected row with file, line and reason
    _manifest.json         fingerprint, counts, file list, timings: written last

Ray's write_parquet appends with fresh names and is not atomic, so a crash can
leave files that a rerun would duplicate. Here every shard has one
deterministic file name, written whole (temp file + rename), and only shards
with a marker count: a rerun rewrites exactly the shards without one.
"""

from __future__ import annotations

import collections
import io
import json
import math
import re
import time
import pyarrow as pa
import pyarrow.parquet as pq

from dpo import schema
from dpo.errors import UserError
from dpo.fingerprint import MANIFEST, diff, FIELD_FIXES
from dpo import storage

PROGRESS = "_progress.json"
SHARDS = "_shards"
REJECTS = "rejects.jsonl"


def reason_kind(reason: str) -> str:
    """A reject reason without its particulars, for counting."""
    return re.sub(r"(?<![\w-])\d+(?![\w-])", "N", re.split(r" \(|: |; ", reason, maxsplit=1)[0])


def start(folder: str, fingerprint: dict, layout: dict) -> set[str]:
    """Claim `folder` for this run; return the shards already done by an earlier try.

    A folder holding a partial run of another fingerprint is refused rather than
    mixed with: its finished shards hold other tokens or other scores.
    """
    progress_path = storage.join(folder, PROGRESS)
    if storage.exists(progress_path):
        previous = json.loads(storage.read_text(progress_path))
        fields = diff(fingerprint, previous.get("fingerprint", {})) + diff(layout, previous.get("layout", {}))
        if fields:
            what = FIELD_FIXES.get(fields[0], f"{fields[0]} differs")
            raise UserError(
                f"{folder} holds an unfinished run made with a different config ({what}); "
                "delete the folder to start over, or set run.output_dir to a new folder"
            )
    else:
        storage.write_text(progress_path, json.dumps({"fingerprint": fingerprint, "layout": layout}, indent=1))
    return {name[: -len(".json")] for name in storage.list_files(storage.join(folder, SHARDS), ".json")}


class ShardWriter:
    """Collects streamed rows by shard and commits each shard the moment it is whole."""

    def __init__(self, folder: str, expected: dict[str, int], scored: bool):
        self.folder, self.expected, self.scored = folder, expected, scored
        self.pending: dict[str, dict[int, dict]] = collections.defaultdict(dict)
        self.done: set[str] = set()  # shards committed this run
        self.committed = 0
        self.rows_done = self.pairs_done = self.tokens_done = 0
        self.redelivered = 0  # rows a retried task delivered again, dropped

    def add(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            shard = row["shard"]
            # A retried task can deliver a row twice, even after its shard was written: kept once, counted.
            if shard in self.done or row["line"] in self.pending[shard]:
                self.redelivered += 1
                continue
            self.pending[shard][row["line"]] = row
            if len(self.pending[shard]) == self.expected[shard]:
                self._commit(shard, self.pending.pop(shard))

    def _commit(self, shard: str, rows_by_line: dict[int, dict]) -> None:
        rows = [rows_by_line[k] for k in sorted(rows_by_line)]
        kept = [r for r in rows if r["reject"] is None]
        rejects = [{"file": r[schema.FILE], "line": r[schema.LINE], "pair_id": r[schema.PAIR_ID], "reason": r["reject"]}
                   for r in rows if r["reject"] is not None]
        columns = schema.dataset_schema(self.scored)
        if self.scored:
            bad = [r[schema.PAIR_ID] for r in kept
                   if not all(math.isfinite(r[c]) for c in schema.SCORE_COLUMNS)]
            if bad:
                raise UserError(
                    f"the reference model gave non-finite log-probs for {len(bad)} pair(s), e.g. {bad[:3]}; "
                    "nothing was written for them. Check the reference weights, or score in model.dtype=float32"
                )
        if kept:
            table = pa.Table.from_pylist([{c: r[c] for c in columns.names} for r in kept], schema=columns)
            buf = io.BytesIO()
            pq.write_table(table, buf)
            storage.write_bytes(storage.join(self.folder, f"part-{shard}.parquet"), buf.getvalue())
        marker = {
            "shard": shard,
            "rows": len(rows),
            "kept": len(kept),
            "rejected": len(rejects),
            "truncated": sum(1 for r in kept if r[schema.TRUNCATED]),
            "identical": sum(1 for r in kept if r[schema.IDENTICAL]),
            "response_tokens": sum(r[schema.CHOSEN_LENGTH] + r[schema.REJECTED_LENGTH] for r in kept),
            "tokens": sum(2 * r[schema.PROMPT_LENGTH] + r[schema.CHOSEN_LENGTH] + r[schema.REJECTED_LENGTH]
                          for r in kept),
            "rejects": rejects,
        }
        if self.scored:
            marker.update({column: dict(collections.Counter(r[column] for r in kept)) for column in schema.SCORED_WHERE})
        storage.write_text(storage.join(self.folder, SHARDS, f"{shard}.json"), json.dumps(marker))
        self.done.add(shard)
        self.committed += 1
        self.rows_done += len(rows)
        self.pairs_done += len(kept)
        self.tokens_done += marker["tokens"]

    @property
    def rows_in(self) -> int:
        """Rows received this run, committed or not."""
        return self.rows_done + sum(len(rows) for rows in self.pending.values())

    def incomplete(self) -> dict[str, int]:
        return {s: len(rows) for s, rows in self.pending.items()}


def finalize(folder: str, expected: dict[str, int], file_rejects: list[dict], manifest: dict) -> dict:
    """Check every shard is done, gather rejects and counts, and write the manifest last."""
    markers = {}
    for shard, rows in expected.items():
        path = storage.join(folder, SHARDS, f"{shard}.json")
        if not storage.exists(path):
            raise RuntimeError(f"shard {shard} of {folder} has no marker after the run; rerun to finish it")
        markers[shard] = json.loads(storage.read_text(path))
        if markers[shard]["rows"] != rows:
            raise RuntimeError(f"shard {shard} of {folder} holds {markers[shard]['rows']} rows, expected {rows}")
    rejects = list(file_rejects)
    for shard in sorted(markers):
        rejects += markers[shard]["rejects"]
    storage.write_text(storage.join(folder, REJECTS),
                       "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects))
    parts = [f"part-{s}.parquet" for s in sorted(markers) if markers[s]["kept"]]
    for name in storage.list_files(folder, ".parquet"):
        if name not in parts:
            storage.delete_file(storage.join(folder, name))  # left by an earlier, different try
    by_reason = collections.Counter(reason_kind(r["reason"]) for r in rejects)
    counts = {
        "read": sum(m["rows"] for m in markers.values()),
        "kept": sum(m["kept"] for m in markers.values()),
        "rejected": sum(m["rejected"] for m in markers.values()),
        "unreadable_files": len(file_rejects),
        "rejected_by_reason": dict(by_reason.most_common()),
        "truncated": sum(m["truncated"] for m in markers.values()),
        "identical": sum(m["identical"] for m in markers.values()),
        "tokens": sum(m["tokens"] for m in markers.values()),
        "response_tokens": sum(m["response_tokens"] for m in markers.values()),
    }
    assert counts["read"] == counts["kept"] + counts["rejected"], counts
    for column in schema.SCORED_WHERE:
        pairs_by = collections.Counter()
        for marker in markers.values():
            pairs_by.update(marker.get(column, {}))
        if pairs_by:
            manifest[column] = dict(sorted(pairs_by.items()))
    manifest = {**manifest, "counts": counts, "files": parts, "shards": len(markers),
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    storage.write_text(storage.join(folder, MANIFEST), json.dumps(manifest, indent=1))
    if counts["kept"] == 0:
        top = ", ".join(f"{k} ({n})" for k, n in by_reason.most_common(3))
        raise UserError(f"no usable pairs: all {counts['read']} input rows were rejected ({top}); "
                        f"see {storage.join(folder, REJECTS)} for each row's file, line and reason")
    return manifest
