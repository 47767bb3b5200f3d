"""``funnel-kpi salesforce-cdc``: subscribe to Change Data Capture channels over the Pub/Sub API
and write each change event to ``crm.raw.salesforce``.

Per channel, one ``Subscribe`` stream: the first ``FetchRequest`` names the channel and where to
start (``CUSTOM`` after the stored replay id, else the configured preset), and asks for
``FUNNEL_SALESFORCE_FETCH`` events; more are asked for when half of them have arrived (flow
control: the server never sends more than was asked for). Each ``FetchResponse``'s events are
decoded (schema by id, cached), written to the raw topic, and once Kafka acknowledged all of
them the last replay id is stored (:mod:`streams.crm.pubsub.replay`). An empty response is
Salesforce's keep-alive: its ``latest_replay_id`` is stored too (nothing is pending), so a quiet
channel never resumes from an id about to expire. No message for
``FUNNEL_SALESFORCE_KEEPALIVE_TIMEOUT`` seconds, a dropped stream, an unreachable host or a Kafka
error reopen the stream from the last stored id after an exponential backoff. A stored id the
API no longer retains (``INVALID_ARGUMENT``, error code ``…replayid…``) falls back to the
configured preset, with a warning that names the backfill to run for the missed time.

Gap events (``GAP_*``; ``GAP_OVERFLOW``) are written like any change event (the adapter counts
them too), counted here and logged with the ``funnel-kpi backfill salesforce --since`` command
that recovers what they stand for.

Start-up refusals (one line, exit 2): credentials Salesforce refuses, a token of another org than
``FUNNEL_SALESFORCE_ORG_ID``, a channel ``GetTopic`` does not know or does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import grpc
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from streams.crm.pubsub import pubsub_api_pb2 as pb2
from streams.crm.pubsub import pubsub_api_pb2_grpc as pb2_grpc
from streams.crm.pubsub.auth import AuthRefused, AuthUnavailable, Tokens, login
from streams.crm.pubsub.events import SchemaCache, Undecodable, change_event, encode, message_key, raw_message
from streams.crm.pubsub.replay import ReplayStore, Stored, key_of
from streams.crm.pubsub.settings import CdcSettings
from streams.crm.sources.common import from_epoch
from streams.http.ingest import METRICS_CONTENT_TYPE, ensure_raw_topics
from streams.kafka import client as kafka_client
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError

log = logging.getLogger("funnel_kpi.salesforce_cdc")
GAPS = ("GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW")
PRESETS = {"EARLIEST": pb2.ReplayPreset.EARLIEST, "LATEST": pb2.ReplayPreset.LATEST}
# HTTP/2 pings keep NAT and proxies from dropping a quiet stream (Salesforce sends its own
# keep-alive response within 270 s); pings only while a call is open, as gRPC servers allow.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 << 20),
]


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "funnel_salesforce_cdc_events",
            "Change events written to the raw topic",
            ["channel", "entity", "change_type"],
            registry=registry,
        )
        self.lag = Gauge(
            "funnel_salesforce_cdc_lag_seconds",
            "Now minus the commitTimestamp of the last change event written (0 once the "
            "stream says it is caught up)",
            ["channel"],
            registry=registry,
        )
        self.gaps = Counter(
            "funnel_salesforce_cdc_gaps",
            "Gap events: changes Salesforce could not describe",
            ["channel", "entity", "change_type"],
            registry=registry,
        )
        self.reconnects = Counter(
            "funnel_salesforce_cdc_reconnects",
            "Streams reopened, by reason",
            ["channel", "reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "funnel_salesforce_cdc_replay_fallbacks",
            "Stored replay ids Salesforce no longer retained (resubscribed from the preset)",
            ["channel"],
            registry=registry,
        )
        self.connected = Gauge(
            "funnel_salesforce_cdc_connected",
            "1 while the channel's stream is open",
            ["channel"],
            registry=registry,
        )
        self.last_message = Gauge(
            "funnel_salesforce_cdc_last_message_timestamp_seconds",
            "When the channel last got a response (events or keep-alive)",
            ["channel"],
            registry=registry,
        )
        self.undecodable = Counter(
            "funnel_salesforce_cdc_undecodable",
            "Events whose payload did not decode (skipped, logged with the replay id)",
            ["channel"],
            registry=registry,
        )
        self.token_refreshes = Gauge(
            "funnel_salesforce_cdc_token_refreshes",
            "Access tokens fetched since start after the first",
            registry=registry,
        )


class StreamEnded(Exception):
    """The server closed the stream, or sent nothing for longer than the keep-alive timeout."""


class ReplayExpired(Exception):
    pass


class Subscriber:
    def __init__(
        self, settings: Settings, cdc: CdcSettings, tokens: Tokens, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.cdc = cdc
        self.tokens = tokens
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.metrics = Metrics(self.registry)
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb2_grpc.PubSubStub | None = None
        self.producer: AIOKafkaProducer | None = None
        self.store: ReplayStore | None = None
        self.schemas = SchemaCache(self._fetch_schema)
        self.runner: web.AppRunner | None = None
        self.fallback: set[str] = set()  # channels whose stored id expired: start from the preset
        self.last_seen: dict[str, float] = {}

    # ------------------------------------------------------------------ start-up
    def open_channel(self) -> None:
        root = self.cdc.salesforce_ca_bundle.read_bytes() if self.cdc.salesforce_ca_bundle else None
        self.channel = grpc.aio.secure_channel(
            self.cdc.salesforce_pubsub_url,
            grpc.ssl_channel_credentials(root_certificates=root),
            options=CHANNEL_OPTIONS,
        )
        self.stub = pb2_grpc.PubSubStub(self.channel)

    async def check_channels(self) -> None:
        """``GetTopic`` for every channel: it exists, this user may subscribe, it is this org's.
        Nothing is logged before every check passed: a refusal is the one line of the command."""
        assert self.stub is not None
        found = []
        for name in self.cdc.channels:
            token = await self.tokens.current()
            try:
                topic = await self.stub.GetTopic(
                    pb2.TopicRequest(topic_name=name), metadata=token.metadata(), timeout=30
                )
            except grpc.aio.AioRpcError as exc:
                raise StartupError(refusal(exc, name, self.cdc)) from None
            if topic.tenant_guid and topic.tenant_guid[:15] != token.org_id[:15]:
                raise AuthRefused(
                    f"the Pub/Sub API answers for org {topic.tenant_guid}, the token is of org "
                    f"{token.org_id}: check FUNNEL_SALESFORCE_PUBSUB_URL and the login URL"
                )
            if not topic.can_subscribe:
                raise StartupError(
                    f"the user may not subscribe to {name}: give it Read on the object (CDC "
                    "events need the entity's read permission) and View All Data or "
                    "access to the records"
                )
            found.append(f"{name} (schema {topic.schema_id})")
        token = self.tokens.token
        log.info(
            "salesforce: logged in to org %s (%s); channels %s",
            token.org_id,
            token.instance_url,
            ", ".join(found),
        )

    async def start(self) -> Subscriber:
        self.open_channel()
        await self.check_channels()
        cdc = self.cdc
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
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.settings.web_bind, cdc.salesforce_cdc_port).start()
        for name in cdc.channels:
            self.metrics.connected.labels(name).set(0)
            self.metrics.lag.labels(name)
            self.metrics.fallbacks.labels(name)
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
        if self.runner is not None:
            await self.runner.cleanup()

    # ------------------------------------------------------------------ running
    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.run_channel(name, stop)) for name in self.cdc.channels]
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

    async def run_channel(self, name: str, stop: asyncio.Event) -> None:
        failures = 0
        while not stop.is_set():
            reason = None
            try:
                delivered = await self.stream(name)
                failures = 0 if delivered else failures
                reason = "ended"
            except ReplayExpired:
                continue  # at once, from the preset
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                reason = code.name.lower()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    await self.tokens.refresh(stale=self.tokens.token)
                log.warning("salesforce: %s stream failed: %s %s", name, code.name, exc.details())
            except StreamEnded as exc:
                reason = "stalled" if "keep-alive" in str(exc) else "ended"
                log.warning("salesforce: %s: %s", name, exc)
            except KafkaError as exc:
                reason = "kafka"
                log.warning(
                    "salesforce: %s: Kafka did not take the events (%s); resubscribing from the "
                    "last stored replay id",
                    name,
                    exc,
                )
            except AuthUnavailable as exc:
                reason = "auth_unavailable"
                log.warning("salesforce: %s: %s", name, exc)
            finally:
                self.metrics.connected.labels(name).set(0)
            self.metrics.reconnects.labels(name, reason).inc()
            delay = min(self.cdc.salesforce_reconnect_max, 0.5 * 2**failures) * random.uniform(0.8, 1.2)
            failures += 1
            log.info("salesforce: reopening %s in %.1fs (%s)", name, delay, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def stream(self, name: str) -> bool:
        """One Subscribe stream until it ends; True if it delivered anything."""
        assert self.stub is not None and self.store is not None
        cdc = self.cdc
        token = await self.tokens.current()
        key = key_of(token.org_id, name)
        stored = self.store.stored.get(key)
        if stored is not None and name not in self.fallback:
            first = pb2.FetchRequest(
                topic_name=name,
                replay_preset=pb2.ReplayPreset.CUSTOM,
                replay_id=stored.replay_id,
                num_requested=cdc.salesforce_fetch,
            )
            log.info("salesforce: %s resuming after replay id %s", name, stored.replay_id.hex())
        else:
            first = pb2.FetchRequest(
                topic_name=name,
                replay_preset=PRESETS[cdc.salesforce_replay_preset],
                num_requested=cdc.salesforce_fetch,
            )
            log.info("salesforce: %s starting at %s", name, cdc.salesforce_replay_preset)
        call = self.stub.Subscribe(metadata=token.metadata())
        delivered = False
        try:
            await call.write(first)
            wanted = cdc.salesforce_fetch
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), cdc.salesforce_keepalive_timeout)
                except TimeoutError:
                    raise StreamEnded(
                        f"no message (not even a keep-alive) for {cdc.salesforce_keepalive_timeout:g}s"
                    ) from None
                except grpc.aio.AioRpcError as exc:
                    if (
                        stored is not None
                        and name not in self.fallback
                        and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                        and "replayid" in _error_code(exc)
                    ):
                        self._expired(name, stored, exc)
                        raise ReplayExpired from None
                    raise
                if response is grpc.aio.EOF:
                    raise StreamEnded("the server closed the stream")
                self.metrics.connected.labels(name).set(1)
                self.metrics.last_message.labels(name).set(time.time())
                self.last_seen[name] = time.monotonic()
                await self.handle(name, key, response)
                delivered = delivered or bool(response.events)
                wanted = response.pending_num_requested
                if wanted <= cdc.salesforce_fetch // 2:
                    await call.write(
                        pb2.FetchRequest(topic_name=name, num_requested=cdc.salesforce_fetch - wanted)
                    )
        finally:
            call.cancel()

    async def handle(self, name: str, key: str, response: Any) -> None:
        """Write a response's events, wait for Kafka's acknowledgements, then store the replay id."""
        assert self.producer is not None and self.store is not None
        if not response.events:
            # A keep-alive. While events are still asked for, "nothing to send" means caught up:
            # lag 0, and its latest replay id is stored (keeping the last change's time for the log).
            if response.pending_num_requested <= 0:
                return
            self.metrics.lag.labels(name).set(0)
            latest = bytes(response.latest_replay_id)
            current = self.store.stored.get(key)
            if latest and (current is None or current.replay_id != latest):
                since = current.commit_timestamp if current is not None else None
                await self.store.save(key, Stored(latest, since))
                self.fallback.discard(name)
            return
        pending = []
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
                await self.producer.send(
                    self.cdc.salesforce_topic, encode(message), key=message_key(change, name)
                )
            )
            header = change["ChangeEventHeader"]
            last_commit = header.get("commitTimestamp")
            self._count(name, header)
        await asyncio.gather(*pending)
        last = bytes(response.events[-1].replay_id)
        await self.store.save(key, Stored(last, last_commit))
        self.fallback.discard(name)
        if isinstance(last_commit, int):
            self.metrics.lag.labels(name).set(max(time.time() - last_commit / 1000, 0))

    def _count(self, name: str, header: dict[str, Any]) -> None:
        entity, change = str(header.get("entityName")), str(header.get("changeType"))
        self.metrics.events.labels(name, entity, change).inc()
        if change in GAPS:
            self.metrics.gaps.labels(name, entity, change).inc()
            when = _when(header.get("commitTimestamp"))
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

    def _expired(self, name: str, stored: Stored, exc: grpc.aio.AioRpcError) -> None:
        self.fallback.add(name)
        self.metrics.fallbacks.labels(name).inc()
        since = _when(stored.commit_timestamp)
        log.warning(
            "salesforce: the stored replay id of %s is no longer retained by Salesforce (%s); resubscribing "
            "from %s. Changes after %s may be missing: run `funnel-kpi backfill salesforce --since %s`",
            name,
            exc.details(),
            self.cdc.salesforce_replay_preset,
            since,
            since,
        )

    async def _fetch_schema(self, schema_id: str) -> str:
        assert self.stub is not None
        token = await self.tokens.current()
        info = await self.stub.GetSchema(
            pb2.SchemaRequest(schema_id=schema_id), metadata=token.metadata(), timeout=30
        )
        return info.schema_json

    # ------------------------------------------------------------------ HTTP
    async def _metrics(self, request: web.Request) -> web.Response:
        self.metrics.token_refreshes.set(self.tokens.refreshes)
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        """200 while every channel got a message within the keep-alive timeout."""
        now = time.monotonic()
        limit = self.cdc.salesforce_keepalive_timeout
        channels = {
            name: "ok" if now - self.last_seen.get(name, -1e9) <= limit else "waiting"
            for name in self.cdc.channels
        }
        ok = all(state == "ok" for state in channels.values())
        return web.json_response(
            {"status": "ok" if ok else "waiting", "channels": channels}, status=200 if ok else 503
        )


def _error_code(exc: grpc.aio.AioRpcError) -> str:
    """Salesforce's own error code, in the ``error-code`` trailer."""
    for key, value in exc.trailing_metadata() or ():
        if key == "error-code":
            return value if isinstance(value, str) else value.decode()
    return ""


def _when(ms: object) -> str:
    return from_epoch(ms, "commitTimestamp") if isinstance(ms, int) and ms >= 0 else "the last stored change"


def refusal(exc: grpc.aio.AioRpcError, channel: str, cdc: CdcSettings) -> str:
    """The one line for a ``GetTopic`` the API refused."""
    code, detail = exc.code(), exc.details() or ""
    where = f"{_error_code(exc)}: {detail}".strip(": ")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"the Salesforce Pub/Sub API refused the access token ({where}): check the connected app's "
            "OAuth scopes (api) and the user's API Enabled permission"
        )
    if code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return (
            f"unknown or forbidden channel {channel} ({where}): select the object for Change Data Capture "
            "in Setup (or name an existing custom channel) and check FUNNEL_SALESFORCE_CHANNELS"
        )
    return (
        f"cannot reach the Salesforce Pub/Sub API at {cdc.salesforce_pubsub_url} ({code.name}: {detail}); "
        "check FUNNEL_SALESFORCE_PUBSUB_URL and FUNNEL_SALESFORCE_CA_BUNDLE"
    )


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
