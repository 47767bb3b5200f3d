"""One ``FetchResponse`` → ``crm.raw.salesforce``, then its replay id stored.

Each event is decoded (schema by id from ``GetSchema``, cached), written to the raw topic, and
once Kafka acknowledged all of them the last replay id is stored
(:mod:`streams.crm.pubsub.replay`): a crash re-reads at most what was not acknowledged. An empty
response is Salesforce's keep-alive: its ``latest_replay_id`` is stored too (nothing is
pending), so a quiet channel never resumes from an id about to expire.

Gap events (``GAP_*``; ``GAP_OVERFLOW``) are written like any change event (the adapter counts
them too), counted here and logged with the ``funnel-kpi backfill salesforce --since`` command
that recovers what they stand for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from streams.crm.pubsub import pubsub_api_pb2 as pb2
from streams.crm.pubsub.auth import Tokens
from streams.crm.pubsub.events import SchemaCache, Undecodable, change_event, encode, message_key, raw_message
from streams.crm.pubsub.metrics import Metrics
from streams.crm.pubsub.replay import ReplayStore, Stored
from streams.crm.pubsub.rpc import PubSubStub
from streams.crm.sources.common import from_epoch

log = logging.getLogger("funnel_kpi.salesforce_cdc")
GAPS = ("GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW")


def backfill_since(ms: object) -> str:
    """The time to give ``funnel-kpi backfill salesforce --since`` for a commit timestamp."""
    return from_epoch(ms, "commitTimestamp") if isinstance(ms, int) and ms >= 0 else "the last stored change"


@dataclass
class RawWriter:
    """Responses of every channel → the raw topic and the replay store (one producer, one schema cache)."""

    topic: str
    stub: PubSubStub
    tokens: Tokens
    producer: AIOKafkaProducer
    store: ReplayStore
    metrics: Metrics
    schemas: SchemaCache = field(init=False)

    def __post_init__(self) -> None:
        self.schemas = SchemaCache(self._fetch_schema)

    async def handle(self, name: str, key: str, response: Any) -> bool:
        """Write a response's events, wait for Kafka's acknowledgements, then store the replay id.
        True if a replay id was stored."""
        if not response.events:
            # A keep-alive. While events are still asked for, "nothing to send" means caught up:
            # lag 0, and its latest replay id is stored (keeping the last change's time for the log).
            if response.pending_num_requested <= 0:
                return False
            self.metrics.lag.labels(name).set(0)
            latest = bytes(response.latest_replay_id)
            current = self.store.stored.get(key)
            if latest and (current is None or current.replay_id != latest):
                since = current.commit_timestamp if current is not None else None
                await self.store.save(key, Stored(latest, since))
                return True
            return False
        pending = []
        headers = []  # counted once Kafka acknowledged them: the metric says "written"
        last_commit = None
        for consumer_event in response.events:
            event = consumer_event.event
            replay_id = bytes(consumer_event.replay_id)
            try:
                schema = await self.schemas.get(event.schema_id)
                change = change_event(schema, event.payload)
            except Undecodable as exc:
                self.metrics.undecodable.labels(name).inc()
                log.error(
                    "salesforce: %s event %s (replay id %s) skipped: %s", name, event.id, replay_id.hex(), exc
                )
                continue
            message = raw_message(name, event.schema_id, replay_id, event.id, change)
            pending.append(
                await self.producer.send(self.topic, encode(message), key=message_key(change, name))
            )
            header = change["ChangeEventHeader"]
            last_commit = header.get("commitTimestamp")
            headers.append(header)
        await asyncio.gather(*pending)
        for header in headers:
            self._count(name, header)
        last = bytes(response.events[-1].replay_id)
        await self.store.save(key, Stored(last, last_commit))
        if isinstance(last_commit, int):
            self.metrics.lag.labels(name).set(max(time.time() - last_commit / 1000, 0))
        return True

    def _count(self, name: str, header: dict[str, Any]) -> None:
        entity, change = str(header.get("entityName")), str(header.get("changeType"))
        self.metrics.events.labels(name, entity, change).inc()
        if change in GAPS:
            self.metrics.gaps.labels(name, entity, change).inc()
            when = backfill_since(header.get("commitTimestamp"))
            ids = header.get("recordIds") or []
            log.warning(
                "salesforce: %s %s at %s: Salesforce could not describe these changes (%s); recover them "
                "with `funnel-kpi backfill salesforce --since %s`",
                entity,
                change,
                when,
                ", ".join(ids[:20]) or "records unknown",
                when,
            )

    async def _fetch_schema(self, schema_id: str) -> str:
        token = await self.tokens.current()
        info = await self.stub.GetSchema(
            pb2.SchemaRequest(schema_id=schema_id), metadata=token.metadata(), timeout=30
        )
        return info.schema_json
