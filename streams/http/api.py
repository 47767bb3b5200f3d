"""KPI HTTP API on the worker web port (documented in ``docs/openapi.yaml``).

Any worker answers: each one follows ``funnel.kpis`` with its own group-less consumer and keeps
the snapshot with the highest ``(generation, sequence)`` per pipeline, exactly as the consumers
of the topic are told to (whichever fleet published it: a rebuild under a new app id outranks
the old fleet).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

import faust
import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from models.config import FORECAST_CATEGORIES
from models.snapshot import KpiSnapshot
from streams.kafka import client as kafka_client
from streams.kafka import topics

log = logging.getLogger("funnel_kpi.api")

# ISO 4217 currencies whose minor unit is not the cent (2 decimals).
MINOR_UNITS = {**dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX",
                                "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
               **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
               "CLF": 4, "UYW": 4}
# Money fields of a snapshot (amounts, not rates: sales velocity per second keeps its precision).
_SET_MONEY = ("won_revenue", "avg_deal_size")
_STAGE_MONEY = ("open_value", "stalled_value")
_TARGET_MONEY = ("target", "won", "expected_to_date", "forecast")
_VALUE_MONEY = ("open_value", "won_revenue", "avg_deal_size")


def minor_unit(currency: str) -> int:
    """Decimals of ``currency``'s minor unit: 2 unless ISO 4217 says otherwise (JPY 0, KWD 3)."""
    return MINOR_UNITS.get(currency.upper(), 2)


def _round(row: dict[str, Any], fields: tuple[str, ...], digits: int) -> None:
    for name in fields:
        if isinstance(row.get(name), float):
            row[name] = round(row[name], digits)


def rounded(body: dict[str, Any], currency: str) -> dict[str, Any]:
    """A dumped snapshot (or leaderboard) with every amount of money rounded to ``currency``'s
    minor unit, in place: sums of floats show as 591027.88, not 591027.8799999999."""
    digits = minor_unit(currency)
    _round(body, ("pipeline_value", "weighted_pipeline"), digits)
    for kpi_set in [body.get("all_time") or {}, *(body.get("windows") or {}).values()]:
        _round(kpi_set, _SET_MONEY, digits)
    for stage in body.get("stages") or []:
        _round(stage, _STAGE_MONEY, digits)
    for row in [*(body.get("leaderboard") or []), *(body.get("teams") or [])]:
        _round(row, ("won_revenue",), digits)
    customers = body.get("customers") or {}
    _round(customers, ("avg_lifetime_value",), digits)
    for customer in customers.get("top") or []:
        _round(customer, ("lifetime_value",), digits)
    for target in (body.get("targets") or {}).values():
        _round(target, _TARGET_MONEY, digits)
    for values in (body.get("dimensions") or {}).values():
        for value in values:
            _round(value, _VALUE_MONEY, digits)
            for stage in value.get("stages") or []:
                _round(stage, ("open_value",), digits)
    for forecast in (body.get("forecast") or {}).values():
        _round(forecast, ("commit", "best_case"), digits)
        _round(forecast.get("categories") or {}, FORECAST_CATEGORIES, digits)
    return body


class SnapshotFeed:
    """The latest valid snapshot per pipeline from ``funnel.kpis``; older pairs are dropped.

    ``on_accepted(snapshot, fleet)`` hears every snapshot that increases the pair of its own
    fleet (``fleet``: the app id in its :data:`~streams.kafka.topics.FLEET_HEADER`, ``None`` from
    versions before it), even while another fleet's pair is higher: both fleets of a rebuild
    publish until the old one is stopped, and each keeps its own stream clock."""

    def __init__(self, on_accepted: Callable[[KpiSnapshot, str | None], None] =
                 lambda snapshot, fleet: None) -> None:
        self.latest: dict[str, KpiSnapshot] = {}
        self.fleet_pairs: dict[tuple[str | None, str], tuple[int, int]] = {}
        self.on_accepted = on_accepted

    def offer(self, raw: bytes, fleet: str | None = None) -> bool:
        """True if ``raw`` is now the snapshot served for its pipeline."""
        try:
            snapshot = KpiSnapshot.model_validate_json(raw)
        except ValidationError:
            return False
        pair = (snapshot.generation, snapshot.sequence)
        if pair > self.fleet_pairs.get((fleet, snapshot.pipeline), (-1, -1)):
            self.fleet_pairs[(fleet, snapshot.pipeline)] = pair
            self.on_accepted(snapshot, fleet)
        current = self.latest.get(snapshot.pipeline)
        if current is not None and pair <= (current.generation, current.sequence):
            return False
        self.latest[snapshot.pipeline] = snapshot
        return True

    async def follow(self, broker_url: str) -> None:
        while True:
            consumer = AIOKafkaConsumer(
                topics.KPIS, **kafka_client.client_args(broker_url),
                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
            )
            try:
                await consumer.start()
                async for message in consumer:
                    if message.value is not None:
                        fleet = dict(message.headers).get(topics.FLEET_HEADER)
                        self.offer(message.value, fleet.decode() if fleet else None)
            except KafkaError as exc:
                log.warning("following %s failed (%s); retrying", topics.KPIS, exc)
                await asyncio.sleep(2)
            finally:
                await consumer.stop()


def register_api(app: faust.App, feed: SnapshotFeed, *, pipelines: list[str],
                 readiness: Callable[[], dict[str, str]], token: str | None) -> None:
    """``readiness()`` gives ``status`` ("ready", or why not) and the state of each dependency."""
    def denied(web: faust.web.View, request: faust.web.Request) -> faust.web.Response | None:
        if not token:
            return None
        given = request.headers.get("Authorization", "")
        if hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return None
        return web.json({"error": "missing or wrong bearer token"}, status=401,
                        headers={"WWW-Authenticate": "Bearer"})

    def json(web: faust.web.View, body: Any, status: int = 200) -> faust.web.Response:
        return web.bytes(orjson.dumps(body), content_type="application/json", status=status)

    def not_found(web: faust.web.View, pipeline: str) -> faust.web.Response:
        if pipeline not in pipelines:
            return json(web, {"error": f"unknown pipeline {pipeline!r}"}, 404)
        return json(web, {"error": f"no snapshot of {pipeline!r} published yet"}, 404)

    @app.page("/kpis")
    async def kpi_index(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return denied(web, request) or json(web, {
            "pipelines": [
                {"pipeline": name, "published": name in feed.latest,
                 "as_of": feed.latest[name].as_of if name in feed.latest else None}
                for name in pipelines
            ]
        })

    def snapshot_view(render: Callable[[KpiSnapshot], Any]):
        async def view(web: faust.web.View, request: faust.web.Request,
                       pipeline: str) -> faust.web.Response:
            if (refused := denied(web, request)) is not None:
                return refused
            snapshot = feed.latest.get(pipeline)
            return json(web, render(snapshot)) if snapshot else not_found(web, pipeline)
        return view

    app.page("/kpis/{pipeline}")(snapshot_view(lambda s: rounded(s.model_dump(mode="json"), s.currency)))
    app.page("/kpis/{pipeline}/leaderboard")(snapshot_view(lambda s: rounded({
        "pipeline": s.pipeline, "as_of": s.as_of, "currency": s.currency,
        "leaderboard": [r.model_dump() for r in s.leaderboard],
        **({} if s.teams is None else {"teams": [t.model_dump() for t in s.teams]}),
    }, s.currency)))

    @app.page("/healthz")
    async def healthz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return json(web, {"status": "ok"})

    @app.page("/readyz")
    async def readyz(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        body = readiness()
        return json(web, body, 200 if body["status"] == "ready" else 503)
