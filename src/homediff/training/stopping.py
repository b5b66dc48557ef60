"""Stopping a run by signal: the first SIGINT/SIGTERM stops after the current step, with a
checkpoint (at once when a single process is waiting for data between steps, where nothing is
lost); a second one stops at once, leaving the last checkpoint as it is."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Callable


class StopWhileWaiting(Exception):
    """A stop signal that came while the loop waited for the next step's data."""


class StopSignals:
    """Installed for the length of a ``with`` block; ``received`` is the first signal's number."""

    def __init__(self, say: Callable[[str], None], checkpoints: Path, single_process: bool):
        self.say, self.checkpoints, self.single_process = say, checkpoints, single_process
        self.received: int | None = None
        self._waiting = False  # for the first micro-batch of a step
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @contextlib.contextmanager
    def waiting(self, between_steps: bool):
        """Marks a wait for data, between steps when ``between_steps``: a signal then stops at once."""
        self._waiting = between_steps
        try:
            yield
        finally:
            self._waiting = False

    def _on_signal(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            # a process forked inside the block (a data-loader worker) inherits the handler: it
            # ends as the signal says, or its parent, joining it at exit, would wait forever
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.received is not None:
            raise KeyboardInterrupt(f"a second stop signal: stopped at once, the last checkpoint "
                                    f"in {self.checkpoints} is intact")
        self.received = signum
        self.say("stopping after this step with a checkpoint (a second Ctrl-C stops at once)")
        if self._waiting and self.single_process:
            raise StopWhileWaiting
