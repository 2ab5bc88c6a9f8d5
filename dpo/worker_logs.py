"""Marks this project's log records in Ray's worker processes, so that the driver can tell them apart.

A job's driver prints every line its workers write. Most are Ray's, vLLM's and
transformers' own (placement group monitors, training reports, weight loading
bars); jobs.logs files those and shows on the terminal only the lines that
start with TERMINAL_MARK, which `mark_our_records` (Ray's
worker_process_setup_hook, run as each worker process starts) puts before the
records of this project's loggers: the training progress, the scoring actors'
warnings.
"""

from __future__ import annotations

import logging
import sys

TERMINAL_MARK = "[raydpo] "
# The loggers this project's modules log to: logging.getLogger("raydpo...") or __name__ in these packages.
OUR_LOGGERS = ("raydpo", "jobs", "pipeline", "dpo")


def is_ours(logger_name: str) -> bool:
    return logger_name.split(".")[0] in OUR_LOGGERS


def mark_our_records() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(TERMINAL_MARK + "%(message)s"))
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        # Not also through the root logger, whose handler (Ray Train's, in training workers) prints them unmarked.
        logger.propagate = False
