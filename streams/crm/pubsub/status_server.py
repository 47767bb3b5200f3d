"""The subscriber's HTTP port: ``/metrics`` for Prometheus and ``/healthz`` for the orchestrator.

Apart from the streams because it only reads what they record (:class:`Metrics`): a channel is
healthy while it got a message, events or keep-alive, within the keep-alive timeout.
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from streams.crm.pubsub.auth import Tokens
from streams.crm.pubsub.metrics import Metrics
from streams.crm.pubsub.settings import CdcSettings
from streams.http.ingest import METRICS_CONTENT_TYPE


class StatusServer:
    """``/metrics`` and ``/healthz`` on ``FUNNEL_SALESFORCE_CDC_PORT``."""

    def __init__(
        self, cdc: CdcSettings, registry: CollectorRegistry, metrics: Metrics, tokens: Tokens
    ) -> None:
        self.cdc = cdc
        self.registry = registry
        self.metrics = metrics
        self.tokens = tokens
        self.runner: web.AppRunner | None = None

    async def start(self, bind: str) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, bind, self.cdc.salesforce_cdc_port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

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
            name: "ok" if now - self.metrics.last_seen.get(name, -1e9) <= limit else "waiting"
            for name in self.cdc.channels
        }
        ok = all(state == "ok" for state in channels.values())
        return web.json_response(
            {"status": "ok" if ok else "waiting", "channels": channels}, status=200 if ok else 503
        )
