"""What ``/readyz`` reports: tables recovered for one group generation, and a broker that
answered lately. Redis is an optional output: reported, never a reason to leave service."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from sinks.process_metrics import ProcessMetrics
from streams.kafka import topics

log = logging.getLogger("funnel_kpi")
# "broker unreachable" after max(3 ticks, this) seconds without a broker answer.
BROKER_SILENCE_MIN_S = 30.0


class Readiness:
    def __init__(self, metrics: ProcessMetrics, tick_interval: float,
                 redis_healthy: Callable[[], bool] | None) -> None:
        self.metrics = metrics
        self.silence_limit = max(3 * tick_interval, BROKER_SILENCE_MIN_S)
        self.redis_healthy = redis_healthy
        self.generations: dict[str, int | None] = dict.fromkeys(topics.TABLES)
        self.broker_answered_at = time.monotonic()
        metrics.broker_ack_age.set_function(lambda: time.monotonic() - self.broker_answered_at)

    def table_ready(self, name: str, generation: int) -> bool:
        """A table recovered for ``generation``: True once every table is, for that one."""
        self.generations[name] = generation
        self.metrics.ready.set(1 if self.tables_ready() else 0)
        return self.tables_ready()

    def tables_ready(self) -> bool:
        generations = set(self.generations.values())
        return len(generations) == 1 and None not in generations

    def revoked(self) -> None:
        self.generations = dict.fromkeys(topics.TABLES)
        self.metrics.ready.set(0)

    def broker_answered(self) -> None:
        self.broker_answered_at = time.monotonic()

    async def probe(self, answers: list[Awaitable], ask: Callable[[], Awaitable]) -> None:
        """A tick's own sends prove the broker answers; a worker that sent none ``ask``s it, so
        funnel_broker_ack_age_seconds never goes stale on a healthy idle worker."""
        try:
            await (asyncio.gather(*answers) if answers else ask())
        except Exception as exc:  # the next tick tries again; the age gauge keeps growing
            log.warning("broker did not answer the tick: %r", exc)
            return
        self.broker_answered()

    def report(self) -> dict[str, str]:
        silent = time.monotonic() - self.broker_answered_at
        broker_ok = silent <= self.silence_limit
        tables = self.tables_ready()
        body = {"status": "ready" if tables and broker_ok else
                "recovering" if broker_ok else "broker unreachable",
                "tables": "recovered" if tables else "recovering",
                "broker": "ok" if broker_ok else f"no answer for {silent:.0f}s"}
        if self.redis_healthy is not None:
            body["redis"] = "ok" if self.redis_healthy() else "unreachable"
        return body
