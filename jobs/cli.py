"""What every entry point shares: arguments, config, logging, Ray, and clean failure.

A user's mistake (`UserError`) ends the job with one line on stderr and exit
code 2, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Callable, Iterator, Optional

from dpo.config import Config, UserError, load_config
from pipeline.vllm_build import check_torchvision

log = logging.getLogger("raydpo")


def parse(argv: Optional[list[str]], description: str, extra=None) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.num_workers=4")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def init_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    # Under `ray job submit` RAY_ADDRESS points at the cluster and the job's
    # runtime env already ships the code. A local run starts its own Ray,
    # without the dashboard, which would double start-up time on a laptop.
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(logging_level=logging.WARNING, include_dashboard=False)


@contextlib.contextmanager
def job(name: str, argv: Optional[list[str]], description: str, extra=None,
        before_ray: Optional[Callable[[Config, argparse.Namespace], None]] = None,
        ) -> Iterator[tuple[Config, argparse.Namespace]]:
    """`before_ray(cfg, args)` runs what needs no cluster, such as the model folder checks: a wrong path
    then fails in a moment, not after Ray's start-up."""
    setup_logging()
    try:
        cfg, args = parse(argv, description, extra)
        log.info("%s: resolved config\n%s", name, cfg.to_yaml().rstrip())
        check_torchvision()
        if before_ray is not None:
            before_ray(cfg, args)
        init_ray()
        yield cfg, args
    except Exception as exc:
        cause = user_error_in(exc)
        if cause is None:
            raise
        sys.stdout.flush()
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def user_error_in(exc: BaseException) -> Optional[UserError]:
    """The UserError behind `exc`, also when Ray wrapped it on its way from a worker."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None
