"""Hostile input end to end: hypothesis-generated messages through a real broker and worker
(issue 7, item 5).

The decoder and the batch processor have their own property tests (tests/test_event.py,
tests/test_processor.py); here generated messages travel the whole path: producer → Tansu →
Faust → deal agent → DLQ / tables → ``/metrics``. Each generated message is built with one
known defect (or none), so its fate is known in advance: huge strings, deep nesting, NaN and
Infinity, far-future and ancient timestamps, unicode stage and pipeline names, messages just
over (and just under) the 1 MiB limit, tombstones, non-objects. They are interleaved with valid
events. Then: every defective message is in ``crm.events.dlq`` with the expected reason code,
its original bytes (cut to 64 KiB when larger) and its source offset; nothing valid is there;
the valid events are counted exactly (accepted, open deals, open value); the worker's RSS
stays bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from models.kpis import total
from streams.kafka import topics
from streams.tools.broker import EmbeddedBroker

from .conftest import WorkerProcess, wait_until

pytestmark = pytest.mark.broker

MIB = 1024 * 1024
DLQ_CUT = 64 * 1024
MAX_TEXT = 512
CANONICAL_STAGES = {"lead", "mql", "sql", "opportunity", "won", "lost"}
PIPELINES = {"default", "lifecycle"}
VALID_TS = "2024-05-01T10:00:00Z"
# RSS may grow by this much over the whole module (Python arenas, Faust buffers of 1 MiB
# messages); a leak of the hostile bytes themselves would be far beyond it.
RSS_GROWTH_LIMIT = 200 * MIB


@dataclass
class Case:
    """One message to send and what must become of it."""

    value: bytes | None
    expect: str  # "accepted" or the DLQ reason code
    amount: int = 0  # accepted ones: their deal's amount (each is a new deal in stage lead)
    key: bytes | None = None


_ids = itertools.count()


def _base(**extra) -> dict:
    n = next(_ids)
    return {"event_id": f"hostile:{n}", "deal_id": f"hostile:deal:{n}",
            "occurred_at": VALID_TS, "stage": "lead", "source": "api", **extra}


def _doc(doc: dict, expect: str, amount: int = 0) -> Case:
    value = orjson.dumps(doc)
    if len(value) > MIB:  # checked first: a long string of control characters escapes past it
        expect = "too_large"
    return Case(value, expect, amount, doc.get("deal_id", "").encode()[:200])


def _long(piece: str, length: int) -> str:
    return (piece * (length // len(piece) + 1))[:length]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _with_raw_field(doc: dict, name: str, raw_json: str) -> bytes:
    """``doc`` with one extra member whose JSON text is given as is (NaN, deep nesting …)."""
    return orjson.dumps(doc)[:-1] + f',"{name}":{raw_json}}}'.encode()


amounts = st.integers(min_value=0, max_value=1_000_000)
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # what JSON encoders can write
texts = st.text(min_size=1, max_size=12)


@st.composite
def valid_events(draw) -> Case:
    """Valid, if odd: unicode owner/account, the earliest accepted time, deep or big unknown
    fields."""
    amount = draw(amounts)
    doc = _base(amount=amount, currency="USD")
    kind = draw(st.sampled_from(["plain", "unicode", "earliest", "deep_extra", "big_extra"]))
    if kind == "unicode":
        doc["owner"] = draw(st.text(min_size=1, max_size=MAX_TEXT))
        doc["account"] = draw(st.text(min_size=1, max_size=MAX_TEXT))
    elif kind == "earliest":  # FUNNEL_MIN_OCCURRED_AT's default is accepted
        doc["occurred_at"] = "2000-01-01T00:00:00Z"
    elif kind == "deep_extra":  # unknown fields are ignored, however deep (below orjson's 1024)
        depth = draw(st.integers(min_value=1, max_value=1000))
        return Case(_with_raw_field(doc, "x_extra", _nested(depth)), "accepted", amount,
                    doc["deal_id"].encode())
    elif kind == "big_extra":  # up to just under the 1 MiB limit
        room = MIB - len(orjson.dumps(doc)) - len(',"x_pad":""')
        # drawn as a share, not a byte count: ``room`` depends on the id counter, and a
        # strategy's bounds must not change between hypothesis' runs of the same example
        size = room - room // 2 * draw(st.integers(min_value=0, max_value=1000)) // 1000
        doc["x_pad"] = "p" * size
    return _doc(doc, "accepted", amount)


@st.composite
def hostile_events(draw) -> Case:
    kind = draw(st.sampled_from([
        "bytes", "nan", "deep_known", "deep_limit", "huge_string", "bad_amount", "future",
        "ancient", "bad_ts", "unicode_stage", "unknown_pipeline", "too_large", "not_object", "missing",
        "tombstone", "bad_currency", "bad_version",
    ]))
    if kind == "bytes":
        raw = draw(st.binary(max_size=300))
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Case(raw, "invalid_json")
        return Case(raw, "invalid_event")  # valid JSON from random bytes is never an event
    if kind == "nan":
        literal = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400"]))
        doc = _base()
        return Case(orjson.dumps(doc)[:-1] + f',"amount":{literal}}}'.encode(), "invalid_json")
    if kind == "deep_known":  # nesting where a string or number belongs
        field = draw(st.sampled_from(["owner", "stage", "amount", "deal_id", "occurred_at"]))
        doc = _base()
        doc.pop(field, None)
        depth = draw(st.integers(min_value=1, max_value=1000))
        return Case(_with_raw_field(doc, field, _nested(depth)), "invalid_event")
    if kind == "deep_limit":  # beyond orjson's depth limit: not parseable at all
        depth = draw(st.integers(min_value=1024, max_value=200_000))
        return Case(_with_raw_field(_base(), "x_extra", _nested(depth)), "invalid_json")
    if kind == "huge_string":
        field = draw(st.sampled_from(["event_id", "deal_id", "stage", "owner", "account",
                                      "pipeline", "source"]))
        limit = 64 if field == "source" else MAX_TEXT
        length = draw(st.integers(min_value=limit + 1, max_value=200_000))
        return _doc(_base(**{field: _long(draw(texts), length)}), "invalid_event")
    if kind == "bad_amount":
        amount = draw(st.one_of(
            st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
            st.integers(min_value=-(2**63), max_value=-1), texts, st.lists(ints, max_size=3),
        ))
        return _doc(_base(amount=amount), "invalid_event")
    if kind == "future":
        year = draw(st.integers(min_value=2100, max_value=9998))
        return _doc(_base(occurred_at=f"{year:04d}-06-01T00:00:00+00:00"), "future_timestamp")
    if kind == "ancient":  # CRM "zero dates" and anything before FUNNEL_MIN_OCCURRED_AT
        year = draw(st.integers(min_value=1, max_value=1999))
        return _doc(_base(occurred_at=f"{year:04d}-01-01T00:00:00Z"), "ancient_timestamp")
    if kind == "bad_ts":
        ts = draw(st.one_of(
            st.sampled_from(["2024-05-01T10:00:00", "2024-13-45T00:00:00Z", "yesterday",
                             "0000-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "", "2024-05-01"]),
            st.text(alphabet=st.characters(blacklist_categories=("Nd", "Cs")), min_size=1,
                    max_size=40),
            ints, st.none(),
        ))
        return _doc(_base(occurred_at=ts), "invalid_event")
    if kind == "unicode_stage":
        stage = draw(st.text(min_size=1, max_size=MAX_TEXT).filter(
            lambda s: s not in CANONICAL_STAGES))
        return _doc(_base(stage=stage, source=None), "unmapped_stage")
    if kind == "unknown_pipeline":
        pipeline = draw(st.text(min_size=1, max_size=MAX_TEXT).filter(
            lambda s: s not in PIPELINES))
        return _doc(_base(pipeline=pipeline), "unknown_pipeline")
    if kind == "too_large":
        doc = _base()
        over = draw(st.integers(min_value=1, max_value=4096))
        doc["x_pad"] = "p" * (MIB + over - len(orjson.dumps(doc)) - len(',"x_pad":""'))
        return _doc(doc, "too_large")
    if kind == "not_object":
        value = draw(st.one_of(st.lists(ints, max_size=5), ints, texts,
                               st.none(), st.booleans()))
        return Case(orjson.dumps(value), "invalid_event")
    if kind == "missing":
        doc = _base(amount=5)
        drop = draw(st.sampled_from(["event_id", "deal_id", "occurred_at", "changes"]))
        if drop == "changes":
            doc = {k: doc[k] for k in ("event_id", "deal_id", "occurred_at", "source")}
        else:
            doc.pop(drop)
        return _doc(doc, "invalid_event")
    if kind == "tombstone":
        return Case(None, "empty", key=b"tombstone")
    if kind == "bad_currency":
        currency = draw(st.text(max_size=8).filter(
            lambda c: not (len(c) == 3 and c.isascii() and c.isalpha() and c.isupper())))
        return _doc(_base(amount=1, currency=currency), "invalid_event")
    return _doc(_base(schema_version=draw(ints.filter(lambda v: v != 1))),
                "invalid_event")


class Harness:
    """One broker and one worker for the module; a DLQ reader that remembers where it was."""

    def __init__(self, broker: EmbeddedBroker, worker: WorkerProcess) -> None:
        self.broker, self.worker = broker, worker
        self.valid = 0
        self.valid_amount = 0
        self.hostile = 0
        self.sent: dict[tuple[int, int], Case] = {}  # (partition, offset) → case
        self.dlq: list = []
        self.dlq_position: dict[int, int] = {}
        self.rss: list[float] = []
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def rss_now(self) -> float:
        return total(self.worker.samples(), "process_resident_memory_bytes")

    def send(self, cases: list[Case]) -> None:
        async def go() -> None:
            producer = AIOKafkaProducer(
                bootstrap_servers=topics.bootstrap_servers(self.broker.url),
                max_request_size=4 * MIB, acks="all",  # > 1 MiB messages need a bigger request
            )
            await producer.start()
            try:
                futures = [await producer.send(topics.EVENTS, case.value, key=case.key)
                           for case in cases]
                for case, future in zip(cases, futures, strict=True):
                    meta = await future
                    self.sent[(meta.partition, meta.offset)] = case
            finally:
                await producer.stop()

        self.run(go())
        for case in cases:
            if case.expect == "accepted":
                self.valid += 1
                self.valid_amount += case.amount
            else:
                self.hostile += 1

    def settle(self, timeout: float = 60) -> None:
        def counted():
            samples = self.worker.samples()
            if not samples:
                return False
            return (total(samples, "funnel_events_total", outcome="accepted") == self.valid
                    and total(samples, "funnel_events_total", outcome="rejected") == self.hostile
                    and total(samples, "funnel_dlq_messages_total") == self.hostile)
        wait_until(counted, timeout, what=f"{self.valid} accepted, {self.hostile} rejected")

    def read_dlq(self, expected: int, timeout: float = 30) -> list:
        async def go() -> list:
            consumer = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap_servers(self.broker.url),
                                        enable_auto_commit=False, fetch_max_bytes=16 * MIB,
                                        max_partition_fetch_bytes=4 * MIB)
            await consumer.start()
            try:
                tps = [TopicPartition(topics.DLQ, p)
                       for p in sorted(consumer.partitions_for_topic(topics.DLQ) or ())]
                consumer.assign(tps)
                for tp in tps:
                    consumer.seek(tp, self.dlq_position.get(tp.partition, 0))
                found = []
                deadline = time.monotonic() + timeout
                while len(found) < expected and time.monotonic() < deadline:
                    for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                        found.extend(messages)
                        self.dlq_position[tp.partition] = messages[-1].offset + 1
                return found
            finally:
                await consumer.stop()

        found = self.run(go())
        self.dlq.extend(found)
        return found

    def check(self, cases: list[Case]) -> None:
        """Send a batch, then check every outcome: counts, DLQ contents, open deals."""
        hostile = [c for c in cases if c.expect != "accepted"]
        self.send(cases)
        self.settle()
        found = self.read_dlq(len(hostile))
        assert len(found) == len(hostile)
        for message in found:
            headers = dict(message.headers)
            where = (int(headers["funnel.source.partition"]), int(headers["funnel.source.offset"]))
            case = self.sent[where]  # a message we sent, at the offset the header names ...
            assert headers["funnel.source.topic"] == topics.EVENTS.encode()
            assert case.expect != "accepted", (case, headers)  # ... and never a valid one
            assert headers["funnel.reason.code"].decode() == case.expect, (
                case.value[:200] if case.value else case.value, headers)
            assert headers["funnel.reason"]  # a human-readable reason
            original = case.value or b""
            if len(original) > DLQ_CUT:
                assert message.value == original[:DLQ_CUT]
                assert int(headers["funnel.original.size"]) == len(original)
            else:
                assert (message.value or b"") == original
        samples = self.worker.samples()
        assert total(samples, "funnel_deals_open", pipeline="default", stage="lead") == self.valid
        assert total(samples, "funnel_open_value", pipeline="default", stage="lead") == \
            self.valid_amount
        self.rss.append(self.rss_now())


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile")
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        worker = WorkerProcess(broker.url, workdir, "hostile").start()
        try:
            worker.wait_ready()
            running = Harness(broker, worker)
            running.rss.append(running.rss_now())
            yield running
            assert worker.process.poll() is None, worker.log_tail()  # it never stopped
        finally:
            worker.stop()
            running.loop.close()


def interleave(valid: list[Case], hostile: list[Case], order: list[int]) -> list[Case]:
    pools, out = [list(valid), list(hostile)], []
    for pick in order:
        if pools[pick % 2]:
            out.append(pools[pick % 2].pop())
    return out + pools[0] + pools[1]


@settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.large_base_example])
@given(valid=st.lists(valid_events(), min_size=1, max_size=15),
       hostile=st.lists(hostile_events(), min_size=5, max_size=40),
       order=st.lists(st.integers(0, 1), max_size=45))
def test_generated_hostile_messages_go_to_the_dlq_and_valid_ones_count_exactly(
    harness, valid, hostile, order,
):
    harness.check(interleave(valid, hostile, order))


def test_bursts_around_the_1_mib_limit_keep_memory_bounded(harness):
    """Thirty messages just over 1 MiB, thirty valid ones just under, three times over."""
    for round_ in range(3):
        cases = []
        for i in range(30):
            doc = _base()
            doc["x_pad"] = "o" * (MIB + 1 + i - len(orjson.dumps(doc)) - len(',"x_pad":""'))
            cases.append(_doc(doc, "too_large"))
            amount = 1000 + round_ * 100 + i
            doc = _base(amount=amount, currency="USD")
            doc["x_pad"] = "u" * (MIB - 1 - i - len(orjson.dumps(doc)) - len(',"x_pad":""'))
            cases.append(_doc(doc, "accepted", amount))
        harness.check(cases)
    reasons = Counter(dict(m.headers)["funnel.reason.code"].decode() for m in harness.dlq)
    growth = max(harness.rss) - harness.rss[0]
    print(f"hostile e2e: {harness.valid} valid accepted and counted exactly, {harness.hostile} "
          f"hostile rejected to the DLQ {json.dumps(dict(sorted(reasons.items())))}; RSS "
          f"{harness.rss[0] / MIB:.0f} → max {max(harness.rss) / MIB:.0f} MiB "
          f"(+{growth / MIB:.0f} MiB), last {harness.rss[-1] / MIB:.0f} MiB")
    assert growth < RSS_GROWTH_LIMIT
    # No steady growth either: the last round ends near where the first ended.
    assert harness.rss[-1] - harness.rss[-3] < 64 * MIB
