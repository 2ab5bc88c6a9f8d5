"""Where a job's output goes: what a user needs on the terminal, everything in the job's log file.

The terminal shows this project's log lines (the log file's path first, then
the stages' progress), the summary tables, the one-line error, the lines our
code logs in Ray's workers (the training progress; dpo.worker_logs marks them),
Ray's autoscaler and raylet messages (a node out of memory, a request no node
can hold), and errors from any library. The log file,
`{run.output_dir}/logs/<job>-<YYYYmmdd-HHMMSS>.log`, holds all of that and the
rest: the resolved config, INFO and up of every library on the driver (Ray
Data's progress reports among them), Python warnings, every line any worker
prints, and what Ray's C++ core writes to the driver's stderr: file descriptor 2
points at the file while the job runs, and Python's sys.stderr at the terminal.
"""

from __future__ import annotations

import datetime
import functools
import io
import logging
import os
import sys
import tempfile
from typing import Callable

from dpo import storage
from dpo.config import Config
from dpo.worker_logs import TERMINAL_MARK, is_ours

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# `extra=` of a record that goes to the log file only.
FILE_ONLY = {"terminal": False}
# Ray's own loggers on the driver, each with a console handler of its own.
RAY_LOGGERS = ("ray", "ray.data")


def for_terminal(record: logging.LogRecord) -> bool:
    if not getattr(record, "terminal", True):
        return False
    return record.levelno >= (logging.INFO if is_ours(record.name) else logging.ERROR)


def setup_terminal() -> None:
    """Before the config is read (and with it where the log file goes): the terminal only."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FILE_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(for_terminal)
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def _uses_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):  # pytest's capture, a StringIO
        return False


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
        self.stream = open(self.local, "a", encoding="utf-8", buffering=1)
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(logging.Formatter(FILE_FORMAT))
        self.handler.setLevel(logging.INFO)
        self.owns_ray = False
        self._undo: list[Callable[[], None]] = []
        root = logging.getLogger()
        root.addHandler(self.handler)
        self._undo.append(lambda: root.removeHandler(self.handler))
        logging.captureWarnings(True)
        self._undo.append(lambda: logging.captureWarnings(False))
        self._point_fd2_at_file()

    def _point_fd2_at_file(self) -> None:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(self.stream.fileno(), 2)

        def restore_fd2() -> None:
            os.dup2(saved, 2)
            os.close(saved)

        self._undo.append(restore_fd2)
        if _uses_fd2(sys.stderr):
            before = sys.stderr
            sys.stderr = open(os.dup(saved), "w", encoding=before.encoding, errors="backslashreplace", buffering=1)

            def restore_stderr() -> None:
                sys.stderr.close()
                sys.stderr = before

            self._undo.append(restore_stderr)

    def route_ray_loggers(self) -> None:
        """Before ray.init: Ray's driver loggers lose their console handlers and log through the root's."""
        import ray.data  # noqa: F401 (configures the ray.data logger)
        from ray._private.log import PlainRayHandler

        for name in RAY_LOGGERS:
            logger = logging.getLogger(name)
            consoles = [h for h in logger.handlers if isinstance(h, PlainRayHandler)]
            propagated = logger.propagate
            for handler in consoles:
                logger.removeHandler(handler)
            logger.propagate = True

            def restore(logger=logger, consoles=consoles, propagated=propagated) -> None:
                for handler in consoles:
                    logger.addHandler(handler)
                logger.propagate = propagated

            self._undo.append(restore)

    def route_worker_lines(self) -> None:
        """After this job's ray.init: the lines Ray's workers print go to the file, and only ours to the terminal.

        Replaces the handler through which Ray's driver prints its workers' lines
        (Ray 2.60's worker stdstream dispatcher, a private API), keeping Ray's own
        printing for the lines the terminal shows; the job then owns this Ray and
        shuts it down in `close`, so that no late line escapes the file.
        """
        import ray
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        self.owns_ray = True
        printers = [handler for name, handler in dispatcher.handlers if name == "ray_print_logs"]
        if not printers:
            return
        filed = logging.getLogger("workers")
        filed.propagate = False
        filed.setLevel(logging.INFO)
        filed.addHandler(self.handler)
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("ray_print_logs", functools.partial(route_worker_batch, printers[0], filed))

        def restore() -> None:
            filed.removeHandler(self.handler)
            dispatcher.remove_handler("ray_print_logs")
            if ray.is_initialized():
                dispatcher.add_handler("ray_print_logs", printers[0])

        self._undo.append(restore)

    def close(self) -> None:
        if self.owns_ray:
            import ray

            ray.shutdown()
        for undo in reversed(self._undo):
            undo()
        self.stream.close()
        if self.local != self.path:
            try:
                with open(self.local, "rb") as fh:
                    storage.write_bytes(self.path, fh.read())
            except OSError as exc:  # the job's own outcome, not the log's upload, is what the user must see
                print(f"warning: the job's log could not be written to {self.path} ({exc}); it stays at {self.local}",
                      file=sys.stderr)
                return
            os.remove(self.local)


def route_worker_batch(print_lines: Callable[[dict], None], filed: logging.Logger, batch: dict) -> None:
    """Files every line of a batch from one worker; hands `print_lines` (Ray's printer) the ones the terminal shows.

    The autoscaler's batches are its whole log, a status table every few seconds;
    Ray's printer shows only their events (a request no node can hold), and so
    does the file.
    """
    if batch.get("pid") == "autoscaler":
        from ray._private.worker import filter_autoscaler_events

        for line in filter_autoscaler_events(batch.get("lines", [])):
            filed.info("(autoscaler) %s", line)
        print_lines(batch)
        return
    source = batch.get("actor_name") or batch.get("task_name")
    prefix = f"({source} pid={batch.get('pid')}) " if source else f"(pid={batch.get('pid')}) "
    shown = []
    for line in batch.get("lines", []):
        if line.startswith(TERMINAL_MARK):
            line = line[len(TERMINAL_MARK):]
            shown.append(line)
        filed.info("%s%s", prefix, line)
    if batch.get("pid") == "raylet":
        print_lines(batch)
    elif shown:
        print_lines({**batch, "lines": shown})
