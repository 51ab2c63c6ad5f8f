"""SIGTERM and SIGHUP end an answer the way Ctrl-C does: the partial answer is kept, saved and marked.

The handlers raise :class:`Terminated`, a KeyboardInterrupt, in the main thread, so
every path that already keeps a partial answer on Ctrl-C keeps it on ``kill`` and on a
closed terminal too; the process then exits with 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal other than SIGINT."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return exc.exit_code if isinstance(exc, Terminated) else 130


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """While inside: SIGTERM and SIGHUP raise Terminated (in the main thread only; elsewhere nothing changes)."""

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous: dict[int, Any] = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is None:
            continue
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. an embedding application)
            break
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
