"""SIGTERM and Ctrl-C: stop a training run at a step boundary, so its checkpoint is consistent.

Outside the training loop a signal interrupts at once (there is nothing to save). Inside it
(:meth:`StopSignals.deferred`) the first signal only records a stop request that the loop honours
after the current step; a second one interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal; ``exit_code`` follows the shell's 128 + signal number (130, 143)."""

    def __init__(self, signum: int, message: str = "") -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Handlers for SIGINT and SIGTERM while installed (a context manager, main thread only).

    ``requested`` is the signal number of a deferred stop request, or None.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._defer = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[StopSignals]:
        """Within this block a first signal is only recorded in :attr:`requested`."""
        self._defer = True
        try:
            yield self
        finally:
            self._defer = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._defer and self.requested is None:
            self.requested = signum
            return
        raise RunInterrupted(signum)
