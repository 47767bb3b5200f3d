"""The one clock for windows, stalls and periods."""

from __future__ import annotations

import time

from models.config import Clock


class EventClock:
    """Wall time, or the stream clock.

    The stream clock is the latest event time that was not ahead of its record's broker
    timestamp, taken over the fleet: each worker adopts the latest clock of its fleet's published
    KPI snapshots (the KPI publisher takes the latest of every partition owner's). So one event
    dated in the future never moves it, and every worker's windows, periods and stalls agree
    (it lags a worker's own events by up to a tick or two)."""

    def __init__(self, mode: Clock) -> None:
        self.mode = mode
        self.latest_ms = 0

    def observe(self, ts_ms: int) -> None:
        if ts_ms > self.latest_ms:
            self.latest_ms = ts_ms

    def observe_stored(self, ts_ms: int) -> None:
        """An event time read back from the store (its broker time is not kept): counted only
        when not ahead of this host's wall clock."""
        if ts_ms <= time.time() * 1000:
            self.observe(ts_ms)

    def now_ms(self) -> int:
        return int(time.time() * 1000) if self.mode is Clock.WALL else self.latest_ms
