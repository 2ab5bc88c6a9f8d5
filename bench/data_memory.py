"""What holding the training data costs: load time and memory per rank, before and after Arrow + object store.

    python bench/data_memory.py [--pairs 200000] [--workers 2] [--sides old new]

A synthetic reference dataset of `--pairs` pairs is written as the pipeline
writes one (Parquet parts of data.shard_rows rows, dpo.schema's columns), the
pairs' lengths drawn from real Anthropic HH pairs (harmless-base test)
tokenized by the project's own code (a byte-level BPE of 8192 tokens trained
on them, data.max_length 512, data.max_prompt_length 256); the ids are random.
Then each side starts a real TorchTrainer with `--workers` CPU workers, whose
train loop loads the data as that side's training loop does and builds the
first epoch's plan, and measures itself:

- old: the driver reads the Parquet files and hands Ray Train a Ray Data
  dataset (ray.data.from_arrow, DataConfig(datasets_to_split=[])); every rank
  iterates it whole and builds Python lists of int64 arrays (the Pairs of
  dpo.batching before this change, copied below for the comparison);
- new: the driver lays the columns out once (dpo.launch.read_pairs) and puts
  them in the object store (dpo.launch._put_pairs); every rank maps that copy
  and views it (dpo.batching.Pairs.from_batch), as dpo.train_loop does.

Per rank, MiB above the rank's own memory when its loop starts (Python, torch
and Ray already loaded): private memory (RssAnon), shared memory mapped
(RssShmem: the object store's pages, one copy per node whatever the ranks),
their sum (RSS), each right after loading and again after reading every
pair's ids once (as an epoch does), and the peak (VmHWM, reset when the loop
starts). The driver's part (read, lay out, put) happens once per run: its
time, its peak RSS above where it started (which counts the object store's
pages it wrote: the node's one copy), and what it holds after, private and
shared. Wall times on a busy machine say little, so CPU seconds are given
beside them. --sides new alone is what larger --pairs can afford.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hh import HH, hh_texts, load_pairs
from train_throughput import reset_peak

from dpo import schema

STATUS = ("RssAnon", "RssShmem", "VmRSS", "VmHWM")


def status() -> dict:
    """Memory fields of /proc/self/status, MiB."""
    out = {}
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in STATUS:
                out[key] = int(value.split()[0]) / 1024
    return out


# --------------------------------------------------------------------------- the old implementation


@dataclass
class OldPairs:
    """dpo.batching.Pairs before Arrow, for the comparison only: Python lists of int64 arrays."""

    pair_ids: list
    prompt: list
    chosen: list
    rejected: list
    ref_chosen: Optional[np.ndarray]
    ref_rejected: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def tokens_per_pair(self) -> np.ndarray:
        return np.array([2 * len(p) + len(c) + len(r) for p, c, r in zip(self.prompt, self.chosen, self.rejected)])

    @classmethod
    def from_tables(cls, tables: Iterable[pa.Table]) -> "OldPairs":
        table = pa.concat_tables(list(tables)).sort_by("pair_id")

        def ids(col: str) -> list:
            return [np.asarray(v, dtype=np.int64) for v in table.column(col).to_pylist()]

        return cls(table.column("pair_id").to_pylist(), ids("prompt_ids"), ids("chosen_ids"), ids("rejected_ids"),
                   table.column("ref_chosen_logp").to_numpy().astype(np.float64),
                   table.column("ref_rejected_logp").to_numpy().astype(np.float64))


# --------------------------------------------------------------------------- the data


def hh_lengths(sample: int) -> np.ndarray:
    """[sample, 3] (prompt, chosen, rejected) token counts of real HH pairs, as the pipeline tokenizes them."""
    from dpo.config import DataConfig
    from pipeline.models import train_tokenizer

    tokenizer = train_tokenizer(hh_texts(HH, limit=2000), vocab_size=8192)
    pairs = load_pairs(sample, tokenizer, DataConfig(max_length=512, max_prompt_length=256))
    return np.array([[len(p), len(c), len(r)] for p, c, r in pairs])


def write_dataset(folder: str, lengths: np.ndarray, n: int, shard_rows: int = 1000) -> list[str]:
    """n pairs whose lengths are drawn from `lengths`, as Parquet parts of shard_rows rows; their names."""
    rng = np.random.default_rng(0)
    names = []
    for start in range(0, n, shard_rows):
        rows = min(shard_rows, n - start)
        drawn = lengths[rng.integers(0, len(lengths), rows)]
        columns = {schema.PAIR_ID: pa.array([f"{h:016x}" for h in rng.integers(0, 2**63, rows)])}
        for k, name in enumerate((schema.PROMPT_IDS, schema.CHOSEN_IDS, schema.REJECTED_IDS)):
            offsets = np.concatenate([[0], np.cumsum(drawn[:, k])]).astype(np.int32)
            values = rng.integers(4, 8192, int(offsets[-1]), dtype=np.int32)
            columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
            columns[name.replace("_ids", "_length")] = pa.array(drawn[:, k], pa.int32())
        columns[schema.TRUNCATED] = pa.array(np.zeros(rows, bool))
        columns[schema.IDENTICAL] = pa.array(np.zeros(rows, bool))
        columns[schema.FILE] = pa.array(["synthetic.jsonl"] * rows)
        columns[schema.LINE] = pa.array(np.arange(start + 1, start + rows + 1))
        columns[schema.REF_CHOSEN_LOGP] = pa.array(rng.normal(-300, 50, rows))
        columns[schema.REF_REJECTED_LOGP] = pa.array(rng.normal(-300, 50, rows))
        names.append(f"part-{start // shard_rows:06d}.parquet")
        pq.write_table(pa.table(columns, schema=schema.REFERENCE), os.path.join(folder, names[-1]))
    return names


# --------------------------------------------------------------------------- the ranks


def rank_loop(config: dict) -> None:
    import ray
    import ray.train

    from dpo.batching import Pairs, epoch_plan

    rank = ray.train.get_context().get_world_rank()
    gc.collect()
    reset_peak()
    base = status()
    t0, c0 = time.perf_counter(), time.process_time()
    if config["side"] == "old":
        shard = ray.train.get_dataset_shard("train")
        tables = [b for b in shard.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows]
        t1 = time.perf_counter()
        arrow_mib = sum(t.nbytes for t in tables) / 2**20
        pairs = OldPairs.from_tables(tables)
        del tables
    else:
        batch = ray.get(config["pairs"])
        t1 = time.perf_counter()
        arrow_mib = batch.nbytes / 2**20
        pairs = Pairs.from_batch(batch)
    t2 = time.perf_counter()
    # What dpo.train_loop does next with the data: the lengths and the first epoch's plan.
    plan = epoch_plan(pairs.tokens_per_pair, 16, 8, seed=0, epoch=0)
    t3 = time.perf_counter()
    load_s, load_cpu_s = t3 - t0, time.process_time() - c0
    loaded = status()
    # An epoch reads every pair's ids once: the pages a rank ends up touching.
    checksum = sum(int(pairs.prompt[i].sum()) + int(pairs.chosen[i].sum()) + int(pairs.rejected[i].sum())
                   for i in range(len(pairs)))
    read_all = status()
    record = {"rank": rank, "load_s": load_s, "load_cpu_s": load_cpu_s, "arrow_mib": arrow_mib,
              "fetch_s": t1 - t0, "build_s": t2 - t1, "plan_s": t3 - t2, "pairs": len(pairs), "steps": len(plan),
              "checksum": checksum,
              **{f"loaded_{k}": loaded[k] - base[k] for k in STATUS},
              **{f"epoch_{k}": read_all[k] - base[k] for k in STATUS}}
    with open(os.path.join(config["out"], f"{config['side']}-rank{rank}.json"), "w", encoding="utf-8") as fh:
        json.dump(record, fh)


def run_side(side: str, folder: str, files: list[str], n: int, workers: int, tmp: str) -> dict:
    import ray.data
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dpo import storage
    from dpo.launch import DatasetFolder, _put_pairs

    gc.collect()
    pa.default_memory_pool().release_unused()  # what an earlier side freed must not count as this one's
    reset_peak()
    before = status()
    t0, c0 = time.perf_counter(), time.process_time()
    config = {"side": side, "out": tmp}
    kwargs = {}
    if side == "old":
        table = storage.read_parquet_files(folder, files, columns=schema.TOKEN_COLUMNS + schema.SCORE_COLUMNS)
        kwargs = dict(datasets={"train": ray.data.from_arrow(table)}, dataset_config=DataConfig(datasets_to_split=[]))
        del table
    else:
        config["pairs"] = _put_pairs(DatasetFolder(folder, {"files": files, "counts": {"kept": n},
                                                        "layout": {"scored": True}}))
    driver_s, driver_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    after = status()
    TorchTrainer(rank_loop, train_loop_config=config,
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=f"bench-{side}", storage_path=os.path.join(tmp, "ray")), **kwargs).fit()
    ranks = []
    for r in range(workers):
        with open(os.path.join(tmp, f"{side}-rank{r}.json"), encoding="utf-8") as fh:
            ranks.append(json.load(fh))
    return {"driver_s": driver_s, "driver_cpu_s": driver_cpu_s, "driver_peak_mib": after["VmHWM"] - before["VmRSS"],
            "driver_private_mib": after["RssAnon"] - before["RssAnon"],
            "driver_shared_mib": after["RssShmem"] - before["RssShmem"], "ranks": ranks}


def report(n: int, tokens: int, results: dict) -> None:
    print(f"\n## {n} pairs: {tokens / 1e6:.1f}M ids (prompt + chosen + rejected)")
    print(f"{'':38}" + "".join(f"{s:>14}" for s in results))
    rows = [("Arrow a rank receives (MiB)", lambda r: r["ranks"][0]["arrow_mib"]),
            ("driver: read + hand over (s)", lambda r: r["driver_s"]),
            ("driver: read + hand over, CPU (s)", lambda r: r["driver_cpu_s"]),
            ("driver: peak above start (MiB)", lambda r: r["driver_peak_mib"]),
            ("driver: private after (MiB)", lambda r: r["driver_private_mib"]),
            ("driver: shared after (MiB)", lambda r: r["driver_shared_mib"]),
            ("rank: fetch (s), max", lambda r: max(x["fetch_s"] for x in r["ranks"])),
            ("rank: build Pairs (s), max", lambda r: max(x["build_s"] for x in r["ranks"])),
            ("rank: lengths + epoch plan (s), max", lambda r: max(x["plan_s"] for x in r["ranks"])),
            ("rank load + plan (s), max", lambda r: max(x["load_s"] for x in r["ranks"])),
            ("rank load + plan, CPU (s), max", lambda r: max(x["load_cpu_s"] for x in r["ranks"])),
            ("driver + rank load (s)", lambda r: r["driver_s"] + max(x["load_s"] for x in r["ranks"]))]
    for when in ("loaded", "epoch"):
        for key, name in (("RssAnon", "private"), ("RssShmem", "shared"), ("VmRSS", "RSS")):
            rows.append((f"rank {name}, {'after load' if when == 'loaded' else 'after an epoch'} (MiB), max",
                         lambda r, k=f"{when}_{key}": max(x[k] for x in r["ranks"])))
    rows.append(("rank peak RSS (MiB), max", lambda r: max(x["epoch_VmHWM"] for x in r["ranks"])))
    for name, get in rows:
        print(f"{name:38}" + "".join(f"{get(r):14.2f}" if "(s)" in name else f"{get(r):14.0f}"
                                     for r in results.values()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[200_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sides", nargs="+", choices=["old", "new"], default=["old", "new"])
    ap.add_argument("--json", help="also write every figure here")
    args = ap.parse_args()
    if not HH.exists():
        sys.exit(f"{HH} is absent: this benchmark draws its lengths from Anthropic HH pairs in ../shared/data")
    import ray
    import ray.data

    lengths = hh_lengths(2000)
    # Ray Data's ingest on the old side needs CPUs beside the workers'.
    ray.init(num_cpus=args.workers + 2, include_dashboard=False, logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{args.workers} workers, lengths drawn from {len(lengths)} HH pairs (mean prompt / chosen / rejected "
          f"{' / '.join(f'{m:.0f}' for m in lengths.mean(0))} tokens)")
    everything = {}
    for n in args.pairs:
        with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
            folder = os.path.join(tmp, "reference")
            os.makedirs(folder)
            files = write_dataset(folder, lengths, n)
            parquet_mib = sum(os.path.getsize(os.path.join(folder, f)) for f in files) / 2**20
            results = {side: run_side(side, folder, files, n, args.workers, tmp) for side in args.sides}
            lengths_read = pq.read_table(folder, columns=[schema.PROMPT_LENGTH, schema.CHOSEN_LENGTH,
                                                          schema.REJECTED_LENGTH])
            tokens = sum(int(pc.sum(c).as_py()) for c in lengths_read.columns)
        if len({x["checksum"] for r in results.values() for x in r["ranks"]}) != 1:
            sys.exit("the ranks (or the sides) read different ids")
        report(n, int(tokens), results)
        print(f"(Parquet on disk: {parquet_mib:.0f} MiB in {len(files)} files)")
        everything[n] = {"parquet_mib": parquet_mib, "tokens": int(tokens), **results}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(everything, fh, indent=1)


if __name__ == "__main__":
    main()
