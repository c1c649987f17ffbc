"""Requests that the training loop stop at its next step instead of the process dying mid-step: SIGINT,
SIGTERM, and the death of the launcher that started this process."""

from __future__ import annotations

import os
import signal


def launcher_pid() -> int | None:
    """The parent's pid when a launcher started this process (torchrun, accelerate launch), else None (a plain
    process may outlive its parent on purpose: ``nohup python train.py &``)."""
    launched = any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "ACCELERATE_USE_CPU"))
    return os.getppid() if launched else None


class StopRequests:
    """SIGINT and SIGTERM (and, given the ``parent`` pid, that process's death: this process re-parented) ask
    the training loop to stop at its next step instead of ending the process; ``close`` restores the previous
    handlers. ``reason`` names the first request and ``code`` is the exit status to end with (128 + signal)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, parent: int | None = None):
        self.parent = parent
        self.reason: str | None = None
        self.code = 0
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            self.code = 128 + signum

    def requested(self) -> bool:
        """True once a signal came or the watched parent is gone."""
        if self.reason is None and self.parent is not None and os.getppid() != self.parent:
            self.reason = f"the death of its launcher (pid {self.parent})"
            self.code = 128 + signal.SIGHUP
        return self.reason is not None

    def close(self) -> None:
        """Restore the signal handlers that were there before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
