"""Where ftdeploy's log lines go when a command runs: the library logs through ``logging`` and never
prints; the command line (and each server worker it starts) shows the ``ftdeploy`` loggers on
standard output, one plain line per record, for as long as the command runs."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record is written (a caller may redirect it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


@contextlib.contextmanager
def showing_logs(level: int = logging.INFO) -> Iterator[None]:
    """Show the ``ftdeploy`` loggers' records at ``level`` and above on standard output while the
    block runs; the logging set-up is as it was afterwards (``main`` may be called in-process)."""
    logger = logging.getLogger("ftdeploy")
    handler, before = _Stdout(), (logger.level, logger.propagate)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    # shown here, not again by a root handler a dependency may set up (onnxruntime's tools call basicConfig)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = before
