"""What every command line shares: the mapping from errors to exit codes, and logging.

:func:`run_cli` runs a command's body: the library's log records go to stderr (through tqdm, so they never break a
progress bar), and an error of the library (:class:`~smi_timm.errors.SmiTimmError`) or of the operating system
(``OSError``: a full disk, a permission) ends the command with ``PROG: error: MESSAGE`` and the exit code of
:data:`EXIT_CODES`; any other exception is a bug: its traceback is shown (exit code 1).

This module imports no torch, so that ``smi-make-shards`` starts fast; the shared argument groups are in
:mod:`smi_timm.cli.args`.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Dict, Type

from ..errors import CheckpointError, SmiTimmError, TrainingError

__all__ = ["EXIT_OK", "EXIT_BAD_INPUT", "EXIT_NON_FINITE", "EXIT_CHECKPOINT", "EXIT_CODES", "exit_code", "run_cli",
           "setup_logging", "fail"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2    # a configuration, data, weights or checkpoint problem the message names
EXIT_NON_FINITE = 3   # the loss became NaN / inf; nothing was written after the last good checkpoint
EXIT_CHECKPOINT = 4   # a checkpoint could not be written (full disk, permissions); the last good one is intact

#: exception class -> exit code; the most specific class in an exception's MRO wins (a non-finite loss is a
#: TrainingError, a failed checkpoint write a CheckpointError)
EXIT_CODES: Dict[Type[BaseException], int] = {
    OSError: EXIT_BAD_INPUT,
    SmiTimmError: EXIT_BAD_INPUT,
    TrainingError: EXIT_NON_FINITE,
    CheckpointError: EXIT_CHECKPOINT,
}


def exit_code(err: BaseException) -> int:
    """The exit code of ``err`` (:data:`EXIT_CODES`, by its class hierarchy); 1 for anything else."""
    for cls in type(err).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return 1


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is at the time of each record (so that a command
    called in-process, e.g. by a test that captures stderr, never writes to a stream that has gone away)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # set by StreamHandler.__init__; the current sys.stderr is always used
        pass


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Send the library's log records (``smi_timm.*``) to stderr: INFO and above, DEBUG with ``verbose``."""
    logger = logging.getLogger("smi_timm")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):  # one per process, however many commands
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logger


def run_cli(prog: str, body: Callable[[], int], *, verbose: bool = False) -> int:
    """Run a command's ``body`` with logging set up; map the library's errors to exit codes."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    logger = setup_logging(verbose)
    try:
        with logging_redirect_tqdm(loggers=[logger]):
            return body()
    except (SmiTimmError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return exit_code(err)


def fail(prog: str, message: str, code: int = EXIT_BAD_INPUT) -> int:
    """Print ``PROG: error: MESSAGE`` to stderr; returns ``code`` (for a command's ``return``)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code
