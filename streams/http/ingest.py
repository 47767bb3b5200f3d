"""``funnel-kpi ingest``: the HTTP edge for CRM webhooks (HubSpot, Pipedrive).

It only authenticates, bounds and stores: the raw body goes to ``crm.raw.<source>`` exactly as
received (so signatures can be re-checked and adapters re-run), and the CRM gets its 2xx only
once the broker has confirmed the write (acks=all). Adapting happens later, in
:mod:`streams.crm.adapt`, so a payload the adapter cannot read is kept in the DLQ instead of being
refused here, where a refusal loses it: both CRMs drop a webhook after a few failed tries.

Answers: 204 stored; 401 bad or missing credentials; 400 not a webhook body at all; 413 too
large; 404 source not configured; 503 the broker did not confirm in time (the CRM retries).
Bad input never yields a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from streams.crm.sources import hubspot, pipedrive
from streams.crm.sources.common import Malformed
from streams.crm.sources.settings import SourceSettings
from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.kafka.settings import Settings

log = logging.getLogger("funnel_kpi.ingest")
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4"
Handler = Callable[[web.Request], Awaitable[web.Response]]


class Refused(Exception):
    """A request answered with a 4xx/503 and a short reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


async def ensure_raw_topics(settings: Settings, names: list[str]) -> None:
    """Create missing raw topics; existing ones are used with whatever partitions they have
    (raw topics are not co-partitioned with anything, and CDC connectors may create them)."""
    with contextlib.suppress(topics.TopicMismatch):
        await topics.ensure_topics(
            settings.broker,
            dict.fromkeys(names, settings.partitions),
            replication_factor=settings.replication_factor,
            configs=dict.fromkeys(names, topics.KEEP_ALL),
        )


def start_producer_args(settings: Settings, max_message: int) -> dict:
    return {
        **kafka_client.client_args(settings.broker),
        "acks": "all",
        "linger_ms": 0,
        "max_request_size": max_message + 64 * 1024,
    }


class Ingest:
    """The aiohttp application and what its handlers share."""

    def __init__(
        self, sources: SourceSettings, producer: AIOKafkaProducer, registry: CollectorRegistry | None = None
    ) -> None:
        self.sources = sources
        self.producer = producer
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "funnel_ingest_requests",
            "Webhook requests by source and HTTP status",
            ["source", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "funnel_ingest_request_seconds",
            "Webhook request handling time",
            ["source"],
            registry=self.registry,
        )
        self.hubspot_secret = (
            sources.hubspot_client_secret.get_secret_value() if sources.hubspot_client_secret else None
        )
        self.pipedrive_auth = (
            sources.pipedrive_basic_auth.get_secret_value().encode() if sources.pipedrive_basic_auth else None
        )

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.sources.ingest_max_body)
        if self.hubspot_secret:
            app.router.add_post("/webhooks/hubspot", self._counted("hubspot", self.hubspot))
        if self.pipedrive_auth:
            app.router.add_post("/webhooks/pipedrive", self._counted("pipedrive", self.pipedrive))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        return app

    def _counted(self, source: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.Response:
            started = time.perf_counter()
            try:
                response = await handler(request)
            except Refused as exc:
                if exc.status >= 500:
                    log.warning("%s webhook not stored: %s", source, exc.reason)
                else:
                    log.info(
                        "%s webhook refused (%s) from %s: %s", source, exc.status, request.remote, exc.reason
                    )
                response = web.json_response({"error": exc.reason}, status=exc.status, headers=exc.headers)
            self.requests.labels(source, str(response.status)).inc()
            self.seconds.labels(source).observe(time.perf_counter() - started)
            return response

        return counted

    async def hubspot(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        try:
            version = hubspot.verify(
                self.hubspot_secret or "",
                self.sources.signature_versions,
                request.headers,
                request.method,
                self._uri(request),
                body,
                int(time.time() * 1000),
            )
        except PermissionError as exc:
            raise Refused(401, str(exc)) from None
        events = self._parsed(hubspot.parse, body)
        if events:
            await self._store(self.sources.hubspot_topic, body, f"hubspot-{version}")
        return web.Response(status=204)

    async def pipedrive(self, request: web.Request) -> web.Response:
        self._basic_auth(request)
        body = await self._body(request)
        self._parsed(pipedrive.parse, body)
        await self._store(self.sources.pipedrive_topic, body, "basic")
        return web.Response(status=204)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": METRICS_CONTENT_TYPE}
        )

    def _basic_auth(self, request: web.Request) -> None:
        challenge = {"WWW-Authenticate": 'Basic realm="funnel-kpi"'}
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            given = b""
        if scheme.lower() != "basic" or not hmac.compare_digest(given, self.pipedrive_auth or b"\0"):
            raise Refused(401, "missing or wrong HTTP basic credentials", challenge)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.sources.ingest_max_body
        too_large = Refused(413, f"body larger than {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > limit:
                raise too_large
        return bytes(body)

    @staticmethod
    def _parsed(parse: Callable[[bytes], object], body: bytes) -> object:
        try:
            return parse(body)
        except Malformed as exc:
            raise Refused(400, exc.reason) from None
        except RecursionError:
            raise Refused(400, "JSON nested too deeply") from None

    def _uri(self, request: web.Request) -> str:
        """The URI HubSpot signed: the public URL it calls, as configured or as forwarded."""
        base = self.sources.ingest_public_url
        if not base:
            scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
            host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
            base = f"{scheme}://{host}"
        return base.rstrip("/") + request.raw_path

    async def _store(self, topic: str, body: bytes, auth: str) -> None:
        headers = [
            ("funnel.received_at", str(int(time.time() * 1000)).encode()),
            ("funnel.auth", auth.encode()),
        ]
        try:
            await asyncio.wait_for(
                self.producer.send_and_wait(topic, body, headers=headers),
                self.sources.ingest_write_timeout,
            )
        except (TimeoutError, KafkaError) as exc:
            raise Refused(
                503, f"could not store the webhook: {type(exc).__name__}", {"Retry-After": "10"}
            ) from None


class IngestServer:
    """The receiver as a start/stop-able unit (the CLI and the end-to-end tests use it)."""

    def __init__(self, settings: Settings, sources: SourceSettings) -> None:
        self.settings = settings
        self.sources = sources
        self.producer: AIOKafkaProducer | None = None
        self.runner: web.AppRunner | None = None
        self.ingest: Ingest | None = None

    async def start(self) -> IngestServer:
        enabled = [
            topic
            for topic, on in (
                (self.sources.hubspot_topic, self.sources.hubspot_client_secret),
                (self.sources.pipedrive_topic, self.sources.pipedrive_basic_auth),
            )
            if on
        ]
        await ensure_raw_topics(self.settings, enabled)
        if not enabled:  # once the broker answered: a refusal before it stays one line
            log.warning(
                "no webhook source is configured (FUNNEL_HUBSPOT_CLIENT_SECRET, "
                "FUNNEL_PIPEDRIVE_BASIC_AUTH): every webhook endpoint answers 404"
            )
        self.producer = AIOKafkaProducer(**start_producer_args(self.settings, self.sources.ingest_max_body))
        await self.producer.start()
        self.ingest = Ingest(self.sources, self.producer)
        self.runner = web.AppRunner(self.ingest.app(), access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.sources.ingest_bind, self.sources.ingest_port).start()
        log.info(
            "webhook receiver on %s:%s (%s)",
            self.sources.ingest_bind,
            self.sources.ingest_port,
            ", ".join(enabled) or "no sources",
        )
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.producer is not None:
            await self.producer.stop()


async def run_ingest(settings: Settings, sources: SourceSettings, stop: asyncio.Event) -> None:
    server = await IngestServer(settings, sources).start()
    try:
        await stop.wait()
    finally:
        await server.stop()
