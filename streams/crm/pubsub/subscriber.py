"""``funnel-kpi salesforce-cdc``: subscribe to Change Data Capture channels over the Pub/Sub API
and write each change event to ``crm.raw.salesforce``.

Per channel, one ``Subscribe`` stream with flow control, reopened after a backoff from the last
stored replay id (:mod:`streams.crm.pubsub.channel_stream`); each response's events are decoded,
written to the raw topic and their replay id stored once Kafka acknowledged them, gap events
logged with the backfill that recovers them (:mod:`streams.crm.pubsub.raw_writer`). The series
are :mod:`streams.crm.pubsub.metrics`, served with ``/healthz`` by
:mod:`streams.crm.pubsub.status_server`.

Start-up refusals (one line, exit 2; :mod:`streams.crm.pubsub.startup_checks`): credentials
Salesforce refuses, a token of another org than ``FUNNEL_SALESFORCE_ORG_ID``, a channel
``GetTopic`` does not know or does not allow.

This module wires them together: start-up in order, one task per channel plus the token
refresher, and shutdown.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from streams.crm.pubsub.auth import AuthUnavailable, Tokens, login
from streams.crm.pubsub.channel_stream import ChannelStream
from streams.crm.pubsub.metrics import Metrics
from streams.crm.pubsub.raw_writer import RawWriter
from streams.crm.pubsub.replay import ReplayStore
from streams.crm.pubsub.rpc import PubSubStub
from streams.crm.pubsub.settings import CdcSettings
from streams.crm.pubsub.startup_checks import check_channels, open_channel
from streams.crm.pubsub.status_server import StatusServer
from streams.http.ingest import ensure_raw_topics
from streams.kafka import client as kafka_client
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError

log = logging.getLogger("funnel_kpi.salesforce_cdc")


class Subscriber:
    """Owns the gRPC channel, the producer, the replay store and the HTTP port; runs the channels."""

    def __init__(
        self, settings: Settings, cdc: CdcSettings, tokens: Tokens, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.cdc = cdc
        self.tokens = tokens
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = Metrics(self.registry)
        self.status = StatusServer(cdc, self.registry, self.metrics, tokens)
        self.channel: grpc.aio.Channel | None = None
        self.stub: PubSubStub | None = None
        self.producer: AIOKafkaProducer | None = None
        self.store: ReplayStore | None = None
        self.writer: RawWriter | None = None

    async def start(self) -> Subscriber:
        cdc = self.cdc
        self.channel = open_channel(cdc)
        self.stub = PubSubStub(self.channel)
        await check_channels(self.stub, self.tokens, cdc)
        await ensure_raw_topics(self.settings, [cdc.salesforce_topic])
        self.producer = AIOKafkaProducer(
            **kafka_client.client_args(self.settings.broker),
            acks="all",
            linger_ms=5,
            max_request_size=4 * 1024 * 1024,
        )
        await self.producer.start()
        self.store = ReplayStore(self.settings.broker, cdc.salesforce_replay_topic, self.producer)
        await self.store.ensure(self.settings.replication_factor)
        await self.store.load()
        self.writer = RawWriter(
            cdc.salesforce_topic, self.stub, self.tokens, self.producer, self.store, self.metrics
        )
        await self.status.start(self.settings.web_bind)
        self.metrics.declare(cdc.channels)
        log.info(
            "salesforce: subscribing to %s → %s (metrics on port %s)",
            ", ".join(cdc.channels),
            cdc.salesforce_topic,
            cdc.salesforce_cdc_port,
        )
        return self

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()
        if self.channel is not None:
            await self.channel.close()
        await self.status.stop()

    async def run(self, stop: asyncio.Event) -> None:
        assert self.stub is not None and self.store is not None and self.writer is not None
        streams = [
            ChannelStream(name, self.cdc, self.stub, self.tokens, self.store, self.writer, self.metrics)
            for name in self.cdc.channels
        ]
        tasks = [asyncio.create_task(stream.run(stop)) for stream in streams]
        tasks.append(asyncio.create_task(self.tokens.keep_fresh(stop)))
        waiter = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([*tasks, waiter], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in [*tasks, waiter]:
                task.cancel()
            await asyncio.gather(*tasks, waiter, return_exceptions=True)


async def run_cdc(settings: Settings, cdc: CdcSettings, stop: asyncio.Event) -> None:
    try:
        token = await asyncio.to_thread(login, cdc)
    except AuthUnavailable as exc:
        raise StartupError(f"{exc}; check FUNNEL_SALESFORCE_LOGIN_URL") from None
    subscriber = Subscriber(settings, cdc, Tokens(cdc, token))
    try:
        await subscriber.start()
        await subscriber.run(stop)
    finally:
        await subscriber.stop()
