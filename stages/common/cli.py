"""The command-line preamble every stage script shares: ``--params``, logging, params, threads, signals.

Each ``stages/<name>.py`` builds its parser with :func:`stage_parser`, adds its own paths, and
calls :func:`start` once the arguments are parsed::

    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--out", required=True, help="...")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)

:func:`start` also makes the stage end cleanly (docs/faults.md):

* SIGTERM (``kill``, a scheduler's timeout) raises :class:`Terminated`, a ``KeyboardInterrupt`` as
  Ctrl-C raises: ``staged_outputs`` removes its build folders and the MLflow run is marked KILLED
  on the way out; the process then ends by the same signal. A second signal while cleaning up is
  ignored (a ``kill -9`` still works; its leftovers go at the next run, see
  ``stages.common.video.remove_stale_temps``). A signal that lands in a garbage collection's
  callback is raised again; cleaning up that hangs is ended after :data:`CLEANUP_SECONDS`.
* Errors in the input (:data:`INPUT_ERRORS`: a bad param, a missing or malformed file) are printed
  as one line, ``<stage>: input error: <message>``, without a traceback; ``CHOPGRAD_TRACEBACK=1``
  shows it. The Prefect flow does not retry a stage that failed so.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import faulthandler
import logging
import os
import random
import signal
import sys
import threading
from pathlib import Path
from typing import TypeVar

from stages.common.params import load_params

__all__ = ["INPUT_ERROR", "INPUT_ERRORS", "LOG_FORMAT", "TRACEBACK_ENV", "Terminated", "stage_parser", "start"]

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
TRACEBACK_ENV = "CHOPGRAD_TRACEBACK"
INPUT_ERROR = "input error"  # the marker of a one-line input error (pipeline/flow.py looks for it)
# Deterministic failures that name their own fix: a traceback adds nothing, a retry cannot help.
INPUT_ERRORS = (ValueError, FileNotFoundError)
CLEANUP_SECONDS = 120  # after a signal, the longest a stage may take to clean up before it is ended

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C, so every ``finally`` and context manager cleans up."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def stage_parser(doc: str | None, stage: str) -> argparse.ArgumentParser:
    """A parser described by the first line of the stage's docstring, with ``--params``."""
    parser = argparse.ArgumentParser(description=(doc or stage).splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help=f"params file with a '{stage}:' section")
    return parser


def start(stage: str, cls: type[T], params_path: str | Path) -> T:
    """Configure logging and signals, load the stage's params section strictly, apply ``threads``.

    A ``threads`` value of 0 leaves torch's default; any other sets ``torch.set_num_threads``.
    """
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    main_module = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_module is not None and main_module.name.startswith("stages."):  # `python -m stages.<name>`,
        _install_handlers(stage)  # not a test calling main(): the handlers are process-wide
    params = load_params(stage, cls, params_path)
    threads = getattr(params, "threads", 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return params


def _install_handlers(stage: str) -> None:
    """SIGTERM and SIGINT raise :class:`Terminated` / ``KeyboardInterrupt`` once; ``sys.excepthook``
    prints input errors and interruptions in one line (see the module docstring).

    Python drops an exception raised inside a weakref callback or ``__del__`` (a garbage collection
    can run the handler there); ``sys.unraisablehook`` then raises it again in the main thread, so a
    signal is never lost. Cleaning up that takes over :data:`CLEANUP_SECONDS` (a library swallowed
    the interruption, or hangs) ends the process with every thread's traceback (``faulthandler``).
    """
    acting_on: list[int] = []  # the signal being acted on; empty until one arrives
    again: list[bool] = []  # a dropped interruption is being raised again

    def interrupt(signum, frame):
        if acting_on and not again:  # cleaning up must not be interrupted in turn
            return
        if not acting_on:
            acting_on.append(signum)
            with contextlib.suppress(Exception):  # no usable stderr: no watchdog, the signal still acts
                faulthandler.dump_traceback_later(CLEANUP_SECONDS, exit=True)
        again.clear()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    def unraisable(info) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt) and acting_on:  # ours, dropped: raise it again
            again.append(True)  # from outside the callback (a signal raised in it would be dropped too),
            delay = random.uniform(0.01, 0.1)  # after a random delay, not in step with a periodic callback
            timer = threading.Timer(delay, _thread.interrupt_main, (acting_on[0],))
            timer.daemon = True  # never holds up the interpreter's exit
            timer.start()
            return
        sys.__unraisablehook__(info)

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    sys.unraisablehook = unraisable
    sys.excepthook = lambda kind, error, trace: _report(stage, kind, error, trace)


def _report(stage: str, kind, error: BaseException, trace) -> None:
    """The stage's last word on an exception that ended it."""
    from stages.common.tracking import TrackingUnavailableError

    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        sys.__excepthook__(kind, error, trace)
    elif isinstance(error, KeyboardInterrupt):
        print(f"{stage}: {str(error) or 'interrupted by SIGINT'}.", file=sys.stderr)
    elif isinstance(error, INPUT_ERRORS):
        print(f"{stage}: {INPUT_ERROR}: {error}\n({TRACEBACK_ENV}=1 shows the traceback.)", file=sys.stderr)
    elif isinstance(error, TrackingUnavailableError):
        print(f"{stage}: error: {error}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, trace)
    if isinstance(error, KeyboardInterrupt):  # end by the signal, as an uncaught one would have
        signum = getattr(error, "signum", signal.SIGINT)
        sys.stderr.flush()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
