"""The tables printed at the end of each stage."""

from __future__ import annotations

from typing import Iterable

from jobs.logs import show


def table(title: str, rows: Iterable[tuple[str, object]]) -> str:
    rows = [(k, str(v)) for k, v in rows]
    width = max([len(k) for k, _ in rows] + [10])
    vwidth = max([len(v) for _, v in rows] + [10])
    line = "+" + "-" * (width + 2) + "+" + "-" * (vwidth + 2) + "+"
    out = [line, f"| {title:<{width + vwidth + 3}} |", line]
    out += [f"| {k:<{width}} | {v:>{vwidth}} |" for k, v in rows]
    out.append(line)
    return "\n".join(out)


def print_dataset_summary(title: str, folder: str, manifest: dict) -> None:
    c = manifest["counts"]
    rows = [("rows read", c["read"]), ("kept", c["kept"]), ("rejected", c["rejected"])]
    rows += [(f"  {reason}", n) for reason, n in c["rejected_by_reason"].items()]
    rows += [("truncated (kept)", c["truncated"]), ("chosen == rejected (kept)", c["identical"]),
             ("tokens", c["tokens"])]
    t = manifest.get("timings", {})
    if t:
        rows += [("time (s)", t.get("total_s")), ("pairs/s this run", t.get("pairs_per_s")),
                 ("tokens/s this run", t.get("tokens_per_s"))]
    if manifest.get("resumed_shards"):
        rows.append(("shards resumed", manifest["resumed_shards"]))
    if manifest.get("redelivered_rows"):
        rows.append(("rows delivered twice (kept once)", manifest["redelivered_rows"]))
    rows.append(("output", folder))
    show(table(title, rows))
