"""Where a job's output goes: what a user needs on the terminal, everything in the job's log file.

The terminal shows this project's log lines (the log file's path first, then
the stages' progress), the summary tables and the one-line error (`show`), the
lines our code logs in Ray's workers (the training progress; dpo.worker_logs
marks them), Ray's autoscaler and raylet messages (a node out of memory, a
request no node can hold), and errors from any library. The log file,
`{run.output_dir}/logs/<job>-<YYYYmmdd-HHMMSS>.log`, holds all of that but the
tables and the rest: the resolved config, INFO and up of every library on the
driver (Ray Data's progress reports among them), Python warnings, every line
any worker prints, and what Ray's C++ core writes to the driver's stderr.

No private Ray API: `logging.config.dictConfig` routes the driver's loggers,
Ray's among them; Ray prints its workers' lines on the driver's sys.stdout and
sys.stderr (`ray.init(log_to_driver=True)`, its default), which are `WorkerLines`
while the job runs; file descriptor 2 points at the file, since Ray's C++ core
writes there and no setting of Ray's sends its notices elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import logging
import logging.config
import os
import re
import sys
import tempfile
import threading
from typing import Optional, TextIO

from dpo import storage
from dpo.config import Config
from dpo.worker_logs import TERMINAL_MARK, is_ours

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# `extra=` of a record that goes to the log file only.
FILE_ONLY = {"terminal": False}
# Ray's own loggers on the driver, each with a console handler of its own.
RAY_LOGGERS = ("ray", "ray.data")
# What Ray's driver prints before a line of its raylet or autoscaler (after its colour codes): the terminal shows those.
RAY_NOTICE = re.compile(r"\((raylet|autoscaler)\b")
COLOURS = re.compile(r"\x1b\[[0-9;]*m")
# The streams our own output goes to while sys.stdout and sys.stderr carry the workers' lines.
_terminal: Optional[tuple[TextIO, TextIO]] = None


def for_terminal(record: logging.LogRecord) -> bool:
    if not getattr(record, "terminal", True):
        return False
    return record.levelno >= (logging.INFO if is_ours(record.name) else logging.ERROR)


def show(text: str, err: bool = False) -> None:
    """Our own output for the terminal: the summary tables, the error line."""
    out, errs = _terminal or (sys.stdout, sys.stderr)
    print(text, file=errs if err else out, flush=True)


def _uses_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):  # pytest's capture, a StringIO
        return False


def _terminal_handler() -> dict:
    return {"class": "logging.StreamHandler", "stream": sys.stdout, "formatter": "terminal", "filters": ["terminal"]}


def _config(handlers: dict) -> dict:
    """Every record through the root's handlers, Ray's loggers losing their own console handlers; the workers'
    lines (`WorkerLines`) to the file alone."""
    filed = [name for name in handlers if name == "file"]
    return {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"terminal": {"format": FILE_FORMAT, "datefmt": "%H:%M:%S"}, "file": {"format": FILE_FORMAT}},
        "filters": {"terminal": {"()": lambda: for_terminal}},
        "handlers": handlers,
        "root": {"level": "INFO", "handlers": list(handlers)},
        "loggers": {**{name: {"handlers": [], "propagate": True} for name in RAY_LOGGERS},
                    "workers": {"handlers": filed, "propagate": False, "level": "INFO"}},
    }


def setup_terminal() -> None:
    """Before the config is read (and with it where the log file goes): the terminal only."""
    logging.config.dictConfig(_config({"terminal": _terminal_handler()}))


class JobLog:
    """The job's log file, from the moment the config names run.output_dir to the job's end (`close`).

    A URI output_dir gets the file when the job ends: it is written locally until then.
    """

    def __init__(self, cfg: Config, job: str):
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.path = storage.join(cfg.run.output_dir, "logs", f"{job}-{stamp}.log")
        if storage.is_uri(self.path):
            fd, self.local = tempfile.mkstemp(prefix=f"{job}-", suffix=".log")
            os.close(fd)
        else:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.local = self.path
        import ray.data  # noqa: F401 (its import gives the ray.data logger the handlers that _config takes away)

        logging.config.dictConfig(_config({
            "terminal": _terminal_handler(),
            "file": {"class": "logging.FileHandler", "filename": self.local, "encoding": "utf-8",
                     "formatter": "file", "level": "INFO"}}))
        logging.captureWarnings(True)
        self.owns_ray = False
        self._redirects = contextlib.ExitStack()
        self._workers: list[WorkerLines] = []
        self._point_fd2_at_file()

    def _point_fd2_at_file(self) -> None:
        """fd 2 to the file; our own stderr output (`show`) to the terminal through a copy of the old fd 2."""
        global _terminal
        sys.stderr.flush()
        saved = os.dup(2)
        fd = os.open(self.local, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 2)
        os.close(fd)
        err = sys.stderr
        if _uses_fd2(err):
            err = open(os.dup(saved), "w", encoding=err.encoding, errors="backslashreplace", buffering=1)
            self._redirects.callback(err.close)
        self._redirects.callback(os.close, saved)
        self._redirects.callback(os.dup2, saved, 2)
        _terminal = (sys.stdout, err)

    def route_worker_lines(self) -> None:
        """After this job's ray.init: the lines Ray prints of its workers go to the file, and only ours to the terminal.

        The job then owns this Ray and shuts it down in `close`, so that no late line escapes the file.
        """
        self.owns_ray = True
        self._workers = [WorkerLines(stream) for stream in _terminal]
        self._redirects.enter_context(contextlib.redirect_stdout(self._workers[0]))
        self._redirects.enter_context(contextlib.redirect_stderr(self._workers[1]))

    def close(self) -> None:
        global _terminal
        if self.owns_ray:
            import ray

            ray.shutdown()
        for lines in self._workers:
            lines.flush()
        self._redirects.close()
        _terminal = None
        logging.captureWarnings(False)
        setup_terminal()
        if self.local != self.path:
            try:
                with open(self.local, "rb") as fh:
                    storage.write_bytes(self.path, fh.read())
            except OSError as exc:  # the job's own outcome, not the log's upload, is what the user must see
                show(f"warning: the job's log could not be written to {self.path} ({exc}); it stays at {self.local}",
                     err=True)
                return
            os.remove(self.local)


class WorkerLines(io.TextIOBase):
    """sys.stdout or sys.stderr while a job runs: what Ray prints there is its workers' output.

    Every line goes to the log file (logger `workers`, without Ray's colour codes); the terminal gets the lines
    our code marked (the mark taken off) and Ray's raylet and autoscaler notices, as Ray printed them.
    """

    def __init__(self, terminal: TextIO):
        self.terminal = terminal
        self.filed = logging.getLogger("workers")
        self._partial = ""
        self._lock = threading.Lock()  # Ray prints from its own thread

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            for line in lines:
                self._route(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial:
                self._route(self._partial)
                self._partial = ""
        self.terminal.flush()

    def _route(self, line: str) -> None:
        ours = TERMINAL_MARK in line
        if ours:
            line = line.replace(TERMINAL_MARK, "", 1)
        plain = COLOURS.sub("", line)
        self.filed.info("%s", plain)
        if ours or RAY_NOTICE.match(plain):
            print(line, file=self.terminal, flush=True)
