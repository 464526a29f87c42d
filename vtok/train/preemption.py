"""Preemption: SIGTERM / SIGUSR1 on any rank makes every rank save a checkpoint and stop."""
from __future__ import annotations

import logging
import signal

from vtok.parallel.dist import any_rank

log = logging.getLogger("vtok.train")

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionWatcher:
    """Records a preemption signal; ``should_stop()`` is the collective agreement (all ranks call it
    at the same point of every step, so a signal to a single rank stops all of them together)."""

    def __init__(self):
        self.received: str = ""
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self) -> bool:
        stop = any_rank(bool(self.received))
        if stop:
            log.warning("preemption requested (%s); saving a checkpoint and exiting",
                        self.received or "signal on another rank")
        return stop

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
