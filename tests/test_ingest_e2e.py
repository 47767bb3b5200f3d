"""End to end on the real broker: webhooks through the HTTP receiver and CDC records through
their raw topics, adapted by the bridge into canonical events, and the refusals of the edge."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from models.event import decode_event
from models.kpis import parse_exposition, total
from streams.crm.adapt import Bridge, context
from streams.crm.sources import debezium, hubspot, pipedrive, salesforce
from streams.crm.sources.settings import SourceSettings
from streams.http.ingest import IngestServer
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.tools.broker import free_port

from .conftest import wait_until
from .test_sources_common import CONFIG, CTX, fixture, raw

pytestmark = pytest.mark.broker
SECRET = "7f3c2a9e-hubspot-client-secret"
BASIC = "pipedrive-hook:s3cr3t-passw0rd"
RAW = ("crm.raw.hubspot", "crm.raw.pipedrive", "crm.raw.salesforce", "crm.raw.debezium")


class Edge:
    """``funnel-kpi ingest`` and ``funnel-kpi adapt`` on a background event loop, as in production
    (separate from the test's own calls, which are plain blocking HTTP and Kafka clients)."""

    def __init__(self, broker_url: str, bridge: bool = True, **overrides) -> None:
        self.settings = Settings(broker=broker_url, partitions=4, session_timeout=6, web_bind="127.0.0.1")
        self.sources = SourceSettings(
            **{
                "ingest_port": free_port(),
                "ingest_bind": "127.0.0.1",
                "adapt_port": free_port(),
                "hubspot_client_secret": SECRET,
                "pipedrive_basic_auth": BASIC,
                **overrides,
            }
        )
        self.with_bridge = bridge
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Edge:
        self.thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.ingest = await IngestServer(self.settings, self.sources).start()
        self.bridge = None
        if self.with_bridge:
            self.bridge = await Bridge(
                self.settings, self.sources, context(self.settings, self.sources)
            ).start()
            self.stopping = asyncio.Event()
            self.running = asyncio.create_task(self.bridge.run(self.stopping))

    def stop(self) -> None:
        self.call(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _stop(self) -> None:
        if self.bridge is not None:
            self.stopping.set()
            await self.running
            await self.bridge.stop()
        await self.ingest.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.sources.ingest_port}{path}"

    def post(self, path: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        request = urllib.request.Request(self.url(path), data=body, headers=headers or {}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def hubspot(self, body: bytes, ts_ms: int | None = None, secret: str = SECRET) -> int:
        ts = str(ts_ms if ts_ms is not None else int(time.time() * 1000))
        signature = hubspot.signature_v3(secret, "POST", self.url("/webhooks/hubspot"), body, ts)
        return self.post(
            "/webhooks/hubspot",
            body,
            {
                "Content-Type": "application/json",
                "X-HubSpot-Signature-v3": signature,
                "X-HubSpot-Request-Timestamp": ts,
                "X-HubSpot-Signature-Version": "v3",
            },
        )

    def pipedrive(self, body: bytes, credentials: str = BASIC) -> int:
        auth = base64.b64encode(credentials.encode()).decode()
        return self.post(
            "/webhooks/pipedrive",
            body,
            {"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
        )

    def bridge_metrics(self):
        url = f"http://127.0.0.1:{self.sources.adapt_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return parse_exposition(response.read().decode())


async def _read(broker_url: str, topic: str) -> list:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=topics.bootstrap_servers(broker_url), enable_auto_commit=False
    )
    await consumer.start()
    try:
        await consumer.topics()
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not tps:
            return []
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        records = []
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for batch in (await consumer.getmany(timeout_ms=500)).values():
                records += batch
        return records
    finally:
        await consumer.stop()


def read(broker_url: str, topic: str) -> list:
    return asyncio.run(_read(broker_url, topic))


async def _produce(broker_url: str, topic: str, messages: list[tuple[bytes | None, bytes | None]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap_servers(broker_url), acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def produce(broker_url: str, topic: str, messages) -> None:
    asyncio.run(_produce(broker_url, topic, messages))


def session_inputs():
    """Every source's scripted session, as sent, and the canonical events its adapter makes."""
    hs = [raw(body) for body in fixture("hubspot_session.json")["bodies"]]
    pd = [raw(body) for body in fixture("pipedrive_session.json")["bodies"]]
    sf = [raw(m) for m in fixture("salesforce_session.json")["messages"]]
    dz = [
        (raw(m["key"]), None if m["value"] is None else raw(m["value"]))
        for m in fixture("debezium_session.json")["messages"]
    ]
    expected = [e for b in hs for e in hubspot.adapt(b, CTX).events]
    expected += [e for b in pd for e in pipedrive.adapt(b, CTX).events]
    expected += [e for b in sf for e in salesforce.adapt(b, CTX).events]
    expected += [e for k, v in dz for e in debezium.adapt(v, CTX, k).events]
    return hs, pd, sf, dz, expected


def send_sessions(edge: Edge, broker_url: str) -> list[dict]:
    hs, pd, sf, dz, expected = session_inputs()
    assert [edge.hubspot(body) for body in hs] == [204] * len(hs)
    assert [edge.pipedrive(body) for body in pd] == [204] * len(pd)
    produce(broker_url, "crm.raw.salesforce", [(None, body) for body in sf])
    produce(broker_url, "crm.raw.debezium", dz)
    return expected


def test_sessions_are_stored_raw_and_adapted_to_canonical_events(broker):
    edge = Edge(broker.url).start()
    try:
        expected = send_sessions(edge, broker.url)
        hs, pd, *_ = session_inputs()
        stored = read(broker.url, "crm.raw.hubspot")
        assert sorted(r.value for r in stored) == sorted(hs)  # byte-exact, as signed
        assert all(dict(r.headers)["funnel.auth"] == b"hubspot-v3" for r in stored)
        assert sorted(r.value for r in read(broker.url, "crm.raw.pipedrive")) == sorted(pd)

        def produced():
            records = read(broker.url, topics.EVENTS)
            return records if len(records) >= len(expected) else None

        records = wait_until(produced, 60, what=f"{len(expected)} canonical events")
        events = [json.loads(r.value) for r in records]
        assert len(events) == len(expected)
        key = lambda e: (e["event_id"], e["deal_id"])  # noqa: E731
        assert sorted(events, key=key) == sorted(expected, key=key)
        for record in records:
            change = decode_event(record.value, now_ms=int(time.time() * 1000), max_skew_ms=86_400_000)
            assert record.key == change.deal_id.encode()  # keyed by deal: one deal, one partition
            if change.stage is not None:
                pipeline = change.pipeline or (
                    "lifecycle" if ":contact:" in change.deal_id or "00Q" in change.deal_id else "default"
                )
                CONFIG.map_stage(change.source, pipeline, change.stage)  # mapped with the shipped config
        samples = edge.bridge_metrics()
        assert total(samples, "funnel_adapt_events_total") == len(expected)
        assert total(samples, "funnel_adapt_gaps_total", source="salesforce") == 2
        assert total(samples, "funnel_adapt_skipped_total", source="debezium", reason="tombstone") == 1
        assert total(samples, "funnel_adapt_messages_total", outcome="dlq") == 0
        assert read(broker.url, topics.DLQ) == []
    finally:
        edge.stop()


def test_malformed_raw_records_go_to_the_dlq_and_the_bridge_goes_on(broker):
    edge = Edge(broker.url).start()
    try:
        good = fixture("salesforce_session.json")["messages"][1]
        bad = [
            b"not json",
            raw(
                {
                    "ChangeEventHeader": {
                        "entityName": "Opportunity",
                        "changeType": "UPDATE",
                        "recordIds": ["006SM0000001Tb3YAE"],
                    },
                    "Amount": -5,
                }
            ),
        ]
        produce(broker.url, "crm.raw.salesforce", [(b"k1", bad[0]), (b"k2", bad[1]), (None, raw(good))])
        hub = [
            fixture("hubspot.json")["deal_amount"],
            {**fixture("hubspot.json")["deal_stage"], "occurredAt": "x"},
        ]
        assert edge.hubspot(raw(hub)) == 204  # authentic, readable as a batch: stored, one record bad
        dlq = wait_until(
            lambda: (r := read(broker.url, topics.DLQ)) and len(r) == 3 and r, 60, what="3 DLQ records"
        )
        events = wait_until(
            lambda: (r := read(broker.url, topics.EVENTS)) and len(r) == 3 and r, 60, what="3 events"
        )
        assert sorted(json.loads(r.value)["deal_id"] for r in events) == [
            "hubspot:deal:332507367156",
            "salesforce:006SM0000001Tb3YAE",
            "salesforce:006SM0000001Tb4YAE",
        ]
        by_value = {r.value: r for r in dlq}
        assert set(by_value) == {bad[0], bad[1], raw(hub)}  # the original bytes
        first = dict(by_value[bad[0]].headers)
        assert (
            first["funnel.reason.code"] == b"invalid_json"
            and first["funnel.source.topic"] == b"crm.raw.salesforce"
        )
        assert by_value[bad[0]].key == b"k1"
        assert {"funnel.reason", "funnel.source.partition", "funnel.source.offset"} <= set(first)
        assert dict(by_value[bad[1]].headers)["funnel.reason.code"] == b"missing_field"
        hub_headers = dict(by_value[raw(hub)].headers)
        assert hub_headers["funnel.auth"] == b"hubspot-v3"  # the raw record's own headers are kept
        assert (
            hub_headers["funnel.reason.code"] == b"bad_timestamp"
            and b"[1].occurredAt" in hub_headers["funnel.reason"]
        )
        samples = edge.bridge_metrics()
        assert total(samples, "funnel_adapt_messages_total", outcome="dlq") == 3
    finally:
        edge.stop()


def test_offsets_are_committed_after_produce_so_a_restart_resumes(broker):
    edge = Edge(broker.url).start()
    sf = [raw(m) for m in fixture("salesforce_session.json")["messages"]]
    try:
        produce(broker.url, "crm.raw.salesforce", [(None, body) for body in sf[:5]])
        wait_until(
            lambda: total(edge.bridge_metrics(), "funnel_adapt_messages_total") == 5, 60, what="5 read"
        )
    finally:
        edge.stop()
    first = len(read(broker.url, topics.EVENTS))
    produce(broker.url, "crm.raw.salesforce", [(None, body) for body in sf[5:]])
    edge = Edge(broker.url).start()
    try:
        wait_until(
            lambda: total(edge.bridge_metrics(), "funnel_adapt_messages_total") == len(sf) - 5,
            60,
            what="the rest read",
        )
    finally:
        edge.stop()
    events = read(broker.url, topics.EVENTS)
    expected = [e for body in sf for e in salesforce.adapt(body, CTX).events]
    assert first == len([e for body in sf[:5] for e in salesforce.adapt(body, CTX).events])
    assert Counter(json.loads(r.value)["event_id"] for r in events) == Counter(
        e["event_id"] for e in expected
    )


def test_refused_requests_write_nothing(broker):
    edge = Edge(broker.url, bridge=False).start()
    try:
        body = raw(fixture("hubspot_session.json")["bodies"][0])
        now = int(time.time() * 1000)
        assert edge.post("/webhooks/hubspot", body) == 401  # unsigned
        assert edge.hubspot(body, secret="wrong-secret") == 401
        assert edge.hubspot(body, ts_ms=now - 6 * 60 * 1000) == 401  # expired timestamp
        assert edge.hubspot(body, ts_ms=now + 6 * 60 * 1000) == 401
        signature = hubspot.signature_v3(SECRET, "POST", edge.url("/webhooks/hubspot"), body, str(now))
        assert (
            edge.post(
                "/webhooks/hubspot",
                body + b" ",
                {"X-HubSpot-Signature-v3": signature, "X-HubSpot-Request-Timestamp": str(now)},
            )
            == 401
        )
        assert edge.hubspot(b'{"not": "an array"}') == 400
        assert edge.hubspot(b"[{]") == 400
        assert edge.hubspot(b"[]") == 204  # nothing to store
        huge = b"[" + b" " * (10 * 1024 * 1024) + b"]"
        assert edge.hubspot(huge) == 413
        assert edge.pipedrive(huge) == 413
        pd_body = raw(fixture("pipedrive_session.json")["bodies"][0])
        assert edge.post("/webhooks/pipedrive", pd_body) == 401
        assert edge.pipedrive(pd_body, credentials="pipedrive-hook:guess") == 401
        assert edge.post("/webhooks/pipedrive", pd_body, {"Authorization": "Basic !!!"}) == 401
        assert edge.pipedrive(b"[1, 2]") == 400
        assert edge.post("/webhooks/salesforce", body) == 404
        with urllib.request.urlopen(edge.url("/healthz"), timeout=5) as response:
            assert response.status == 200
        for topic in RAW[:2]:
            assert read(broker.url, topic) == []
        samples = parse_exposition(urllib.request.urlopen(edge.url("/metrics"), timeout=5).read().decode())
        assert total(samples, "funnel_ingest_requests_total", source="hubspot", status="401") == 5
        assert total(samples, "funnel_ingest_requests_total", source="pipedrive", status="413") == 1
    finally:
        edge.stop()


def test_chunked_oversized_body_is_refused_while_reading(broker):
    edge = Edge(broker.url, bridge=False, ingest_max_body=64 * 1024).start()
    try:

        def chunks():
            for _ in range(40):
                yield b"x" * 4096

        request = urllib.request.Request(
            edge.url("/webhooks/pipedrive"),
            data=chunks(),
            method="POST",
            headers={
                "Authorization": "Basic " + base64.b64encode(BASIC.encode()).decode(),
                "Transfer-Encoding": "chunked",
            },
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 413
        assert read(broker.url, "crm.raw.pipedrive") == []
    finally:
        edge.stop()


def test_a_source_without_its_secret_answers_404(broker):
    edge = Edge(broker.url, bridge=False, hubspot_client_secret=None).start()
    try:
        assert edge.hubspot(raw(fixture("hubspot_session.json")["bodies"][0])) == 404
        assert edge.pipedrive(raw(fixture("pipedrive_session.json")["bodies"][0])) == 204
    finally:
        edge.stop()


def test_scripted_crm_sessions_give_exactly_the_expected_kpis_on_metrics(broker, workers):
    """HubSpot and Pipedrive through the HTTP receiver, Salesforce and Debezium through their raw
    topics, all through the bridge into a real worker: its /metrics show exactly the funnel the
    four sessions describe (see the session fixtures and the per-source unit tests)."""
    worker = workers()
    worker.wait_ready()
    edge = Edge(broker.url).start()
    try:
        expected = send_sessions(edge, broker.url)

        def counted():
            samples = worker.samples()
            return samples if samples and total(samples, "funnel_events_total") >= len(expected) else None

        samples = wait_until(counted, 90, what=f"{len(expected)} events counted by the worker")
    finally:
        edge.stop()
    assert total(samples, "funnel_events_total") == len(expected)
    assert total(samples, "funnel_events_total", outcome="rejected") == 0
    # retried deliveries: HubSpot's retried batch (3), Pipedrive (1), Salesforce (1), Debezium (1)
    assert total(samples, "funnel_events_total", outcome="duplicate") == 6

    def value(name, **labels):
        return total(samples, name, **labels)

    won = {
        "hubspot:owner:111": 5000,
        "pipedrive:user:18487521": 2000,
        "salesforce:005SM000000146PYAQ": 1000,
        "bob": 900,
    }
    for owner, revenue in won.items():
        assert value("funnel_rep_won_revenue", pipeline="default", owner=owner, currency="USD") == revenue
    assert value("funnel_won_revenue", pipeline="default", currency="USD") == sum(won.values())
    assert value("funnel_deals_closed", pipeline="default", outcome="won") == 4
    assert value("funnel_deals_closed", pipeline="default", outcome="lost") == 2  # HubSpot 102, Pipedrive 2
    assert {
        stage: value("funnel_deals_open", pipeline="default", stage=stage)
        for stage in ("lead", "mql", "sql", "opportunity")
    } == {"lead": 2, "mql": 2, "sql": 0, "opportunity": 2}
    assert {
        stage: value("funnel_open_value", pipeline="default", stage=stage, currency="USD")
        for stage in ("lead", "mql", "opportunity")
    } == {"lead": 1000, "mql": 1900, "opportunity": 2000}
    assert value("funnel_deals_closed", pipeline="lifecycle", outcome="won") == 2  # contact 9, the lead
    assert value("funnel_deals_open", pipeline="lifecycle", stage="lead") == 1  # contact 10
