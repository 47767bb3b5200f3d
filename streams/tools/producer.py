"""Writing canonical events to ``crm.events`` (replay, simulator, demo, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer

from models.event import encode_event
from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings


@dataclass
class Summary:
    sent: int = 0
    seconds: float = 0.0
    by_source: Counter = field(default_factory=Counter)

    def line(self) -> str:
        rate = self.sent / self.seconds if self.seconds else 0.0
        sources = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_source.items()))
        return f"sent {self.sent} events in {self.seconds:.1f}s ({rate:,.0f}/s) [{sources}]"


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when asked)."""

    def __init__(self, total: int | None, enabled: bool | None = None) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.last = 0.0

    def update(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < 0.2):
            return
        self.last = now
        if self.total:
            width = 30
            filled = int(width * done / self.total)
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r[{bar}] {done}/{self.total}")
        else:
            sys.stderr.write(f"\r{done} events")
        sys.stderr.flush()

    def close(self, done: int) -> None:
        if self.enabled:
            self.update(done, force=True)
            sys.stderr.write("\n")


async def start_producer(settings: Settings) -> AIOKafkaProducer:
    producer = AIOKafkaProducer(
        **kafka_client.client_args(settings.broker),
        linger_ms=5, max_batch_size=256 * 1024, acks="all",
    )
    await producer.start()
    return producer


async def ensure_event_topics(settings: Settings) -> None:
    await topics.ensure_topics(
        settings.broker, {topics.EVENTS: settings.partitions, topics.DLQ: settings.partitions},
        replication_factor=settings.replication_factor,
    )


async def produce(
    settings: Settings, events: Iterable[dict] | AsyncIterator[dict], *, rate: float = 0.0,
    total: int | None = None, progress: bool | None = None,
) -> Summary:
    """Send events keyed by ``deal_id``; ``rate`` > 0 paces them (events/s)."""
    await ensure_event_topics(settings)
    producer = await start_producer(settings)
    summary = Summary()
    bar = Progress(total, progress)
    started = time.monotonic()
    pending = []
    try:
        async for event in _aiter(events):
            raw = event if isinstance(event, bytes) else encode_event(event)
            key = event.get("deal_id", "") if isinstance(event, dict) else ""
            pending.append(await producer.send(topics.EVENTS, raw, key=str(key).encode()))
            summary.sent += 1
            if isinstance(event, dict):
                summary.by_source[event.get("source", "?")] += 1
            if rate > 0:
                ahead = summary.sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
            bar.update(summary.sent)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    summary.seconds = time.monotonic() - started
    bar.close(summary.sent)
    return summary


async def _aiter(events: Iterable[dict] | AsyncIterator[dict]) -> AsyncIterator[dict]:
    if hasattr(events, "__aiter__"):
        async for event in events:  # type: ignore[union-attr]
            yield event
    else:
        for event in events:  # type: ignore[union-attr]
            yield event
