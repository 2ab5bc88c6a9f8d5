"""The streaming Ray Data stage shared by jobs.prepare and jobs.precompute_reference.

    files ─► read (one task per file) ─► validate + tokenize ─► [score: actor pool] ─► driver: shard files

The splits (train, eval) stream together, tagged, through one actor pool, and
the driver writes each row into its split's folder.

Two passes over the input: a cheap scan (pair ids and positions only) finds
duplicate ids and the size of every shard, then the full pass streams rows
through tokenization (and scoring) into per-shard files. Knowing every shard's
size up front is what lets the writer commit a shard the moment it is whole,
and a rerun skip exactly the shards that were committed.

Both passes fail, naming the resources, when they deliver nothing for
run.stall_timeout_s while tasks or actors wait for resources that nothing
frees (`StallWatch`): on a full cluster Ray would otherwise wait forever, and
say nothing.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import pyarrow as pa
import ray

from dpo.config import Config
from dpo.errors import UserError
from dpo.job_cpus import bundle_text, free_text
from pipeline import manifest as mf
from pipeline.read import RAW_SCHEMA, UnreadableFile, read_file_rows
from pipeline.tokenize import find_duplicates, tokenize_batch

log = logging.getLogger(__name__)

# How often the driver looks at the cluster while no batch comes (at most), and logs its progress.
POLL_S = 5.0
PROGRESS_EVERY_S = 30.0
STREAM_THREAD = "raydpo-stream"
# How long a stopped stream's thread is waited for: its iterator ends within a scheduling step of the shutdown.
STOP_TIMEOUT_S = 30.0


def waiting_demands() -> list[tuple[dict, int]]:
    """(resources, count) that tasks, actors and placement groups wait for: `ray status`'s Pending Demands.

    Empty while the autoscaler launches or starts nodes: the wait then ends by itself.
    """
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    if status.pending_launches or status.pending_nodes:
        return []
    demands = status.resource_demands
    return [(b.bundle, b.count) for d in demands.ray_task_actor_demand + demands.placement_group_demand
            for b in d.bundles_by_count]


class StallWatch:
    """Fails a stage that has delivered nothing for `timeout_s` while something waits on resources throughout."""

    def __init__(self, timeout_s: Optional[float], what: str):
        self.timeout_s, self.what = timeout_s, what
        self.waiting_since: Optional[float] = None

    @property
    def poll_s(self) -> float:
        return POLL_S if self.timeout_s is None else min(POLL_S, self.timeout_s / 5)

    def progressed(self) -> None:
        self.waiting_since = None

    def check(self) -> None:
        """Called when a poll brought nothing."""
        if self.timeout_s is None:
            return
        demands = waiting_demands()
        if not demands:
            self.waiting_since = None
            return
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
        elif now - self.waiting_since >= self.timeout_s:
            raise UserError(self._message(demands))

    def _message(self, demands: list[tuple[dict, int]]) -> str:
        asked = ", ".join(f"{n} x {bundle_text(bundle)}" for bundle, n in demands)
        have = free_text({name for bundle, _ in demands for name in bundle})
        return (f"run.stall_timeout_s: {self.what} delivered nothing for {self.timeout_s:g} s while tasks or actors "
                f"waited for resources ({asked}; free: {have}); whatever holds them (another job, this job's driver "
                "under ray job submit --entrypoint-num-cpus, this job's own actors) does not give them up: free or "
                "add resources, ask for fewer (reference.num_actors, reference.cpus_per_actor), or raise "
                "run.stall_timeout_s (null: wait forever)")


def watched_batches(ds: ray.data.Dataset, watch: StallWatch) -> Iterator[pa.Table]:
    """`ds.iter_batches()`, in the caller's thread, failing by `watch` when the stream stalls.

    Ray Data's iterator blocks without a timeout, so a thread pulls the batches
    and this generator waits for each with one. However it ends (the stream's
    end, a stall, the caller's error or early exit), the stream is shut down,
    its tasks and actors with it, and the thread, whose iterator then ends, is
    joined.
    """
    items: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    # Ray Data (2.60) makes the stream's executor inside iter_batches and gives no public handle on it, and a
    # stalled stream may not have produced the first block that would expose it (Dataset._current_executor).
    executors = []
    create_executor = ds._create_executor

    def capture_executor():
        executors.append(create_executor())
        return executors[-1]

    ds._create_executor = capture_executor

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def pull() -> None:
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as exc:  # handed to the caller's thread, which raises it
            put(("error", exc))

    puller = threading.Thread(target=pull, name=STREAM_THREAD, daemon=True)
    puller.start()
    try:
        while True:
            try:
                kind, item = items.get(timeout=watch.poll_s)
            except queue.Empty:
                watch.check()
                continue
            if kind == "end":
                return
            if kind == "error":
                raise item
            watch.progressed()
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while puller.is_alive() and time.monotonic() < deadline:
            for executor in executors:
                # Idempotent, and a no-op until the executor has started (a stall may be declared sooner): hence
                # the loop. The stream's output then ends, and so does the thread's loop.
                executor.shutdown(force=True)
            with contextlib.suppress(queue.Empty):
                items.get_nowait()  # a thread waiting to put a batch puts it, then finds the stream ended
            puller.join(timeout=0.1)
        if puller.is_alive():
            log.warning("the stream's reader thread did not stop within %g s of the stream's end", STOP_TIMEOUT_S)


def _read_files(batch: dict, *, fmt: str, shard_rows: int, skip_shards: frozenset, ids_only: bool):
    for path, file_index in zip(batch["path"], batch["file_index"]):
        try:
            for rows in read_file_rows(str(path), int(file_index), fmt=fmt, shard_rows=shard_rows,
                                       skip_shards=skip_shards, ids_only=ids_only):
                yield pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
        except UnreadableFile as exc:
            # A row at line 0 stands for the whole file; the driver decides what it means.
            yield pa.Table.from_pylist(
                [{"file": str(path), "file_index": int(file_index), "line": 0, "shard": "", "shard_rows": 0,
                  "pair_id": None, "format": None, "record": None, "error": str(exc)}],
                schema=RAW_SCHEMA,
            )


def read_dataset(files: list[str], cfg: Config, *, skip_shards=frozenset(), ids_only=False) -> ray.data.Dataset:
    items = [{"path": f, "file_index": i} for i, f in enumerate(files)]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _read_files,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"fmt": cfg.data.format, "shard_rows": cfg.data.shard_rows,
                   "skip_shards": frozenset(skip_shards), "ids_only": ids_only},
    )


@dataclass
class Scan:
    files: list[str]
    shard_sizes: dict[str, int]
    duplicates: dict
    file_rejects: list[dict] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.shard_sizes.values())


def scan(files: list[str], cfg: Config) -> Scan:
    """Pass 1: shard sizes, duplicate ids, unreadable files."""
    cols = ["file", "file_index", "line", "shard", "shard_rows", "pair_id", "id_from_content", "error"]
    ids, shard_sizes, unreadable = [], {}, []
    watch = StallWatch(cfg.run.stall_timeout_s, f"the scan of {len(files)} input file(s)")
    for batch in watched_batches(read_dataset(files, cfg, ids_only=True), watch):
        for row in batch.select(cols).to_pylist():
            if row["line"] == 0:
                unreadable.append({"file": row["file"], "line": None, "pair_id": None,
                                   "reason": f"unreadable file: {row['error']}"})
                continue
            shard_sizes[row["shard"]] = row["shard_rows"]
            if row["error"] is None:
                ids.append((row["pair_id"], row["file_index"], row["line"], row["file"], row["id_from_content"]))
    if unreadable and cfg.data.on_unreadable_file == "error":
        first = unreadable[0]
        raise UserError(f"{first['file']}: {first['reason'].removeprefix('unreadable file: ')}; fix or remove the "
                        "file, or set data.on_unreadable_file=skip to record it in rejects.jsonl and go on")
    bad = {r["file"] for r in unreadable}
    if not shard_sizes:
        raise UserError(f"no rows found in {', '.join(files)}: the input files are empty")
    return Scan([f for f in files if f not in bad], dict(sorted(shard_sizes.items())),
                find_duplicates(ids), unreadable)


def tokenized_dataset(sc: Scan, cfg: Config, skip_shards: set) -> ray.data.Dataset:
    dupes = ray.put(sc.duplicates) if sc.duplicates else None
    return read_dataset(sc.files, cfg, skip_shards=frozenset(skip_shards)).map_batches(
        tokenize_batch,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"data": cfg.data, "tokenizer_path": cfg.model.tokenizer_path,
                   "trust_remote_code": cfg.model.trust_remote_code, "duplicates": dupes},
    )


@dataclass(frozen=True)
class Part:
    """One split's share of a stage: its input files and the dataset folder they fill."""

    split: str
    files: list[str]
    folder: str
    fingerprint: dict
    manifest_extra: dict


# A column each tokenized row carries through the stream to say whose folder it goes to; never written.
SPLIT_COLUMN = "_split"


def _tag_split(batch: pa.Table, *, split: str) -> pa.Table:
    return batch.append_column(SPLIT_COLUMN, pa.array([split] * batch.num_rows, pa.string()))


def _rows_of(batch: pa.Table, split: str) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.equal(batch.column(SPLIT_COLUMN), split)).drop_columns([SPLIT_COLUMN])


def run_stage(
    cfg: Config,
    parts: list[Part],
    *,
    score: Optional[Callable[[ray.data.Dataset], ray.data.Dataset]] = None,
) -> dict[str, dict]:
    """Fill each part's folder with its (scored) dataset, resuming what an earlier try finished; the
    manifests by split.

    The parts stream as one dataset, so that one scoring pool serves them all: a pool per split would start
    its actors (and each actor its model, a vLLM engine its minutes on a large model) once per split.
    """
    t0 = time.time()
    layout = {"shard_rows": cfg.data.shard_rows, "scored": score is not None}
    scans, done, writers, streams, todo_rows = {}, {}, {}, [], 0
    for part in parts:
        sc = scans[part.split] = scan(part.files, cfg)
        done[part.split] = mf.start(part.folder, part.fingerprint, layout) & set(sc.shard_sizes)
        todo = {s: n for s, n in sc.shard_sizes.items() if s not in done[part.split]}
        log.info("%s: %d input rows in %d shards; %d shards already done, %d to do", part.folder, sc.rows,
                 len(sc.shard_sizes), len(done[part.split]), len(todo))
        writers[part.split] = mf.ShardWriter(part.folder, sc.shard_sizes, scored=score is not None)
        todo_rows += sum(todo.values())
        if todo:
            streams.append(tokenized_dataset(sc, cfg, done[part.split]).map_batches(
                _tag_split, batch_format="pyarrow", batch_size=None, fn_kwargs={"split": part.split}))
    t_stream = time.time()
    if streams:
        ds = streams[0].union(*streams[1:]) if len(streams) > 1 else streams[0]
        if score is not None:
            ds = score(ds)
        folders = " and ".join(part.folder for part in parts)
        logged = time.monotonic()
        for batch in watched_batches(ds, StallWatch(cfg.run.stall_timeout_s, f"the stage writing {folders}")):
            for split, writer in writers.items():
                rows = _rows_of(batch, split)
                if rows.num_rows:
                    writer.add(rows)
            if time.monotonic() - logged >= PROGRESS_EVERY_S:
                logged = time.monotonic()
                log.info("%s: %d of %d rows through, %d shards written", folders,
                         sum(w.rows_in for w in writers.values()), todo_rows,
                         sum(w.committed for w in writers.values()))
    elapsed = max(time.time() - t_stream, 1e-9)
    pairs = sum(w.pairs_done for w in writers.values())
    tokens = sum(w.tokens_done for w in writers.values())
    manifests = {}
    for part in parts:
        writer = writers[part.split]
        if writer.incomplete():
            raise RuntimeError(f"the stream ended with incomplete shards {writer.incomplete()} in {part.folder}; "
                               "rerun to finish them")
        manifest = {
            "fingerprint": part.fingerprint,
            "layout": layout,
            **part.manifest_extra,
            "resumed_shards": len(done[part.split]),
            "written_shards": writer.committed,
            "redelivered_rows": writer.redelivered,
            "timings": {
                "total_s": round(time.time() - t0, 3),
                # The stream's, which carried every part: its time and rates are the stage's, split by split
                # they would not add up.
                "stream_s": round(elapsed, 3),
                "stream_splits": [p.split for p in parts],
                "pairs_this_run": writer.pairs_done,
                "tokens_this_run": writer.tokens_done,
                "pairs_per_s": round(pairs / elapsed, 3),
                "tokens_per_s": round(tokens / elapsed, 1),
            },
        }
        manifests[part.split] = mf.finalize(part.folder, scans[part.split].shard_sizes,
                                            scans[part.split].file_rejects, manifest)
    return manifests
