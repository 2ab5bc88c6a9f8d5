"""What every entry point shares: arguments, config, logging, Ray, and clean failure.

A user's mistake (`UserError`) ends the job with one line on stderr and exit
code 2, never a traceback; anything else is a bug and keeps its traceback.
The terminal shows what a user needs; the job's log file holds the rest
(jobs.logs).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from typing import Callable, Iterator, Optional

from dpo import storage
from dpo.config import Config, load_config
from dpo.errors import UserError
from dpo.job_cpus import note_free_cpus
from jobs.logs import FILE_ONLY, JobLog, setup_terminal, show
from pipeline.read import expand_inputs
from pipeline.vllm_scorer import check_torchvision

log = logging.getLogger("raydpo")
# How long a cluster's GCS is given to accept a connection before the job counts it dead.
GCS_ANSWER_S = 10.0


def parse(argv: Optional[list[str]], description: str, extra=None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.num_workers=4")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args


def init_ray(job_log: JobLog) -> None:
    """Start Ray, or join the cluster under `ray job submit`; a Ray already running is left as it is."""
    import ray

    from dpo.launch import ray_env_vars

    if ray.is_initialized():
        return
    # Marks our workers' log lines, which the terminal shows (dpo.worker_logs).
    runtime_env = {"worker_process_setup_hook": "dpo.worker_logs.mark_our_records", "env_vars": ray_env_vars()}
    # Under `ray job submit` RAY_ADDRESS points at the cluster and the job's
    # runtime env already ships the code. A local run starts its own Ray,
    # without the dashboard, which would double start-up time on a laptop.
    address = ray_address()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(address, logging_level=logging.WARNING, include_dashboard=False, runtime_env=runtime_env)
    note_free_cpus()
    job_log.route_worker_lines()


def ray_address() -> Optional[str]:
    """What `ray.init` is given: None (Ray's own choice), or "local" instead of a dead recorded cluster.

    Given no address, Ray joins the cluster RAY_ADDRESS names or, without it, the one the last `ray start` on
    this machine recorded in Ray's temp dir, and retries a dead one forever ("Failed to connect to GCS"). So
    its GCS is asked first, for at most GCS_ANSWER_S: a RAY_ADDRESS that does not answer is refused, naming
    the fix; a dead recorded one, which the user did not ask for, is passed over for a local Ray, said in one
    line. A `ray://` or `local` address is Ray's to handle.
    """
    asked = os.environ.get("RAY_ADDRESS")
    if asked and "://" in asked:
        return None
    address = asked if asked not in (None, "", "auto") else _recorded_address()
    if address is None or address == "local" or _gcs_answers(address):
        return None
    if asked:
        raise UserError(f"RAY_ADDRESS={asked}: no Ray cluster answers at {address}; start it, or unset RAY_ADDRESS "
                        "(or set RAY_ADDRESS=local) to run on a local Ray")
    log.warning("no Ray cluster answers at %s, where the last `ray start` on this machine left one (a head that "
                "ended without `ray stop`): this job starts a local Ray instead; `ray stop` clears the record, "
                "RAY_ADDRESS names another cluster", address)
    return "local"


def _recorded_address() -> Optional[str]:
    """The address the last `ray start` on this machine wrote where Ray 2.60 looks for it (no public API reads it)."""
    temp = os.environ.get("RAY_TMPDIR") or (os.environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    try:
        with open(os.path.join(temp or "/tmp", "ray", "ray_current_cluster"), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _gcs_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=GCS_ANSWER_S).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def job(name: str, argv: Optional[list[str]], description: str, extra=None,
        before_ray: Optional[Callable[[Config, argparse.Namespace], None]] = None,
        ) -> Iterator[tuple[Config, argparse.Namespace]]:
    """`before_ray(cfg, args)` runs what needs no cluster, such as the model folder checks: a wrong path
    then fails in a moment, not after Ray's start-up."""
    setup_terminal()
    job_log = None
    try:
        cfg, args = parse(argv, description, extra)
        check_object_stores(cfg)
        job_log = JobLog(cfg, name)
        log.info("%s: the full log goes to %s", name, job_log.path)
        log.info("%s: %s\nresolved config\n%s", name, " ".join(sys.argv), cfg.to_yaml().rstrip(), extra=FILE_ONLY)
        check_torchvision()
        if before_ray is not None:
            before_ray(cfg, args)
        init_ray(job_log)
        yield cfg, args
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is None:
            log.error("%s failed", name, exc_info=True, extra=FILE_ONLY)
            raise
        log.error("error: %s", cause, extra=FILE_ONLY)
        sys.stdout.flush()
        show(f"error: {cause}", err=True)
        sys.exit(2)
    finally:
        if job_log is not None:
            job_log.close()


def check_object_stores(cfg: Config) -> None:
    """Every object-store URI of the config, tried before the job's log, Ray or a stage starts: a mistake in
    the store's name, bucket or endpoint, or an input that is not there, is one line naming the key, not a
    stage's traceback."""
    for key, paths in (("data.train_files", cfg.data.train_files), ("data.eval_files", cfg.data.eval_files)):
        uris = [path for path in paths if storage.is_uri(path)]
        if uris:
            expand_inputs(uris, key)
    if storage.is_uri(cfg.run.output_dir):
        storage.check_uri(cfg.run.output_dir, "run.output_dir", fsspec_too=True)
    for key, path in (("model.policy", cfg.model.policy), ("model.reference", cfg.model.reference),
                      ("model.tokenizer", cfg.model.tokenizer)):
        if path and storage.is_uri(path):
            storage.check_uri(path, key)


def user_error_in(exc: BaseException) -> Optional[UserError]:
    """The UserError behind `exc`, also when Ray wrapped it on its way from a worker."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
