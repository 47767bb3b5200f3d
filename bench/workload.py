"""The generated events every contender reads, and sending them to ``crm.events``.

Events are encoded once up front (``(key, value)`` byte pairs), so every contender reads
byte-identical messages and producing costs the bench as little as possible.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.baselines import PARTITIONS
from models.event import encode_event
from streams.kafka.settings import Settings
from streams.tools.dataset import dataset_events
from streams.tools.producer import ensure_event_topics, start_producer
from streams.tools.simulator import Simulation

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "crm-sales-opportunities"

Message = tuple[bytes, bytes]


def encode(events: Iterable[dict]) -> list[Message]:
    """Copied out of orjson's result: its bytes keep a 4 KiB allocation each (PROFILE.md)."""
    return [(event["deal_id"].encode(), memoryview(encode_event(event)).tobytes())
            for event in events]


def simulated(n: int, seed: int) -> list[Message]:
    return encode(simulated_events(n, seed))


# Three deal properties with the cardinalities CRM reports group by (docs/kpis.md, "Dimensions").
PROPERTIES = {
    "lead_source": ("Organic Search", "Paid Search", "Referral", "Direct", "Email", "Social",
                    "Events", "Partner"),
    "region": ("EMEA", "North America", "LATAM", "APAC", "ANZ"),
    "segment": ("SMB", "Mid-Market", "Enterprise"),
}


def with_properties(events: list[dict]) -> list[dict]:
    """The events with the deal's :data:`PROPERTIES` on its first event and a changed one on
    every tenth after it, as adapters send them (only what changed)."""
    seen: set[str] = set()
    out = []
    for i, event in enumerate(events):
        deal_id = event["deal_id"]
        pick = zlib.crc32(deal_id.encode())
        if deal_id not in seen:
            seen.add(deal_id)
            event = {**event, "properties": {name: values[pick % len(values)]
                                             for name, values in PROPERTIES.items()}}
        elif i % 10 == 0:
            values = PROPERTIES["lead_source"]
            event = {**event, "properties": {"lead_source": values[(pick + i) % len(values)]}}
        out.append(event)
    return out


def simulated_events(n: int, seed: int) -> list[dict]:
    """Exactly ``n`` realistic simulator events (all stages, duplicates, late arrivals)."""
    deals = max(1, n // 5)
    while True:
        events = Simulation(seed=seed, deals=deals).events()
        if len(events) >= n:
            return events[:n]
        deals = int(deals * 1.3) + 1


def dataset(copies: int) -> list[Message]:
    """The CSV dataset ``copies`` times under fresh deal ids (``funnel-kpi replay --copies``)."""
    return encode(dataset_events(DATASET, copies=copies))


def open_deals(n: int, prefix: str, per_deal: int = 2) -> Iterator[dict]:
    """``n`` open deals: created as a lead with amount, owner and account, then (``per_deal``
    = 2) moved to opportunity with an expected close date, the typical state of an open deal."""
    base = datetime.now(UTC) - timedelta(days=20)
    for i in range(n):
        deal_id = f"{prefix}:{i}"
        created = base + timedelta(seconds=i % 86400)
        yield {
            "event_id": f"{deal_id}:0", "deal_id": deal_id, "source": "simulator",
            "occurred_at": created.isoformat().replace("+00:00", "Z"), "stage": "lead",
            "amount": 1000.0 + i % 5000, "currency": "USD", "owner": f"Rep {i % 12}",
            "account": f"Account {i % 400:03d}",
        }
        if per_deal < 2:
            continue
        yield {
            "event_id": f"{deal_id}:1", "deal_id": deal_id, "source": "simulator",
            "occurred_at": (created + timedelta(days=3)).isoformat().replace("+00:00", "Z"),
            "stage": "opportunity",
            "expected_close_at": (created + timedelta(days=40)).isoformat().replace("+00:00", "Z"),
        }


def settings(broker_url: str) -> Settings:
    return Settings(broker=broker_url, partitions=PARTITIONS)


async def send(broker_url: str, messages: list[Message]) -> float:
    """Send as fast as the project's producer settings allow; returns seconds taken."""
    conf = settings(broker_url)
    await ensure_event_topics(conf)
    producer = await start_producer(conf)
    started = time.monotonic()
    try:
        pending = []
        for key, value in messages:
            pending.append(await producer.send("crm.events", value, key=key))
            if len(pending) >= 10_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - started


async def send_paced(broker_url: str, messages: list[Message], rate: float) -> list[float]:
    """Send at a steady ``rate`` events/s; returns each message's send time (monotonic)."""
    conf = settings(broker_url)
    await ensure_event_topics(conf)
    producer = await start_producer(conf)
    sent_at: list[float] = []
    try:
        pending = []
        started = time.monotonic()
        for i, (key, value) in enumerate(messages):
            ahead = started + i / rate - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
            sent_at.append(time.monotonic())
            pending.append(await producer.send("crm.events", value, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent_at
