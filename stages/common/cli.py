"""The command-line preamble every stage script shares: ``--params``, logging, params, threads.

Each ``stages/<name>.py`` builds its parser with :func:`stage_parser`, adds its own paths, and
calls :func:`start` once the arguments are parsed::

    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--out", required=True, help="...")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TypeVar

from stages.common.params import load_params

__all__ = ["LOG_FORMAT", "stage_parser", "start"]

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

T = TypeVar("T")


def stage_parser(doc: str | None, stage: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the stage's docstring, with ``--params``."""
    parser = argparse.ArgumentParser(description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help=f"params file with a '{stage}:' section")
    return parser


def start(stage: str, cls: type[T], params_path: str | Path) -> T:
    """Configure logging, load the stage's params section strictly, and apply ``threads`` if it has one.

    A ``threads`` value of 0 leaves torch's default; any other sets ``torch.set_num_threads``.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    params = load_params(stage, cls, params_path)
    threads = getattr(params, "threads", 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return params
