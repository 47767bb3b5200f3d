"""End to end on the real broker, adapter and worker: ``funnel-kpi salesforce-cdc`` as a process
against a local Pub/Sub API (tests/pubsub_server.py) serving Avro-encoded change events.

The truth is each scripted change event in the streaming API's JSON form run through the
adapter and the deal agent's steps (tests/test_sources_common.py); the worker's /metrics must
show exactly those KPIs, and the raw topic must hold each change event as the JSON the adapter
reads: created, updated with changed-field bitmaps (compound fields too), deleted, undeleted, a
multi-record event, gap events, an expired stored replay id, a dropped stream, a SIGKILL
mid-stream, and the backfill before or after the subscriber."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from models.kpis import total
from streams.crm.sources import salesforce
from streams.kafka import topics
from streams.tools.broker import free_port

from .conftest import ROOT, run_async, scrape, wait_until
from .crm_servers import TOKEN, SalesforceServer, tls_files
from .pubsub_server import ORG, OAuthServer, PubSubServer, login_env
from .test_backfill_convergence import live_events
from .test_backfill_e2e import worker_kpis
from .test_ingest_e2e import _produce, read
from .test_sources_common import CTX, apply, fixture, kpis

pytestmark = pytest.mark.broker
OPP, LEAD = "/data/OpportunityChangeEvent", "/data/LeadChangeEvent"
REPLAY_TOPIC = "funnel.salesforce.replay"
FETCH = 4


def expected_kpis(docs: list[dict]) -> dict:
    events = [e for doc in docs for e in salesforce.adapt(json.dumps(doc).encode(), CTX).events]
    deals, _ = apply(events)
    return {
        name: {k: v for k, v in counters.items() if v}
        for name, counters in kpis(deals).items()
        if name in ("open", "closed", "open_value", "won_revenue")
    }


def change(
    entity: str, kind: str, ids: list[str], key: str, ms: int, changed=(), nulled=(), diff=(), **fields
):
    return {
        "ChangeEventHeader": {
            "entityName": entity,
            "recordIds": ids,
            "changeType": kind,
            "transactionKey": key,
            "sequenceNumber": 1,
            "commitTimestamp": ms,
            "nulledFields": list(nulled),
            "diffFields": list(diff),
            "changedFields": list(changed),
        },
        **fields,
    }


def opportunity(stage: str, amount: float, **more) -> dict:
    return {
        "StageName": stage,
        "Amount": amount,
        "CurrencyIsoCode": "USD",
        "OwnerId": "005SM000000146PYAQ",
        "AccountId": "001SM0000000iibYAA",
        "CloseDate": "2025-12-15",
        "Name": "Widgets",
        "IsClosed": False,
        "IsWon": False,
        **more,
    }


A, B, C, D = "006SM0000002Aa1YAE", "006SM0000002Aa2YAE", "006SM0000002Aa3YAE", "006SM0000002Aa4YAE"
L1 = "00QSM000000Ab1aYAE"
T0 = 1_762_160_400_000  # 2025-11-03T09:00Z
HOUR = 3_600_000


def session() -> list[tuple[str, dict]]:
    """(channel, change event) in the order Salesforce commits them."""
    return [
        (OPP, change("Opportunity", "CREATE", [A], "tx-a1", T0, **opportunity("Prospecting", 1000))),
        (
            OPP,
            change("Opportunity", "CREATE", [B, C], "tx-bc", T0 + HOUR, **opportunity("Qualification", 500)),
        ),
        (
            LEAD,
            change(
                "Lead",
                "CREATE",
                [L1],
                "tx-l1",
                T0 + HOUR,
                Company="Acme",
                Status="Open - Not Contacted",
                Name={"FirstName": "Ada", "LastName": "Byron"},
                OwnerId="005SM000000146PYAQ",
            ),
        ),
        (
            OPP,
            change(
                "Opportunity",
                "UPDATE",
                [A],
                "tx-a2",
                T0 + 2 * HOUR,
                changed=["StageName", "Amount", "Probability", "LastModifiedDate"],
                StageName="Negotiation/Review",
                Amount=1500,
                Probability=90,
                LastModifiedDate="2025-11-03T11:00:00.000Z",
            ),
        ),
        (OPP, change("Opportunity", "DELETE", [C], "tx-c1", T0 + 3 * HOUR)),
        (
            LEAD,
            change(
                "Lead",
                "UPDATE",
                [L1],
                "tx-l2",
                T0 + 3 * HOUR,
                changed=["Status", "Name.LastName"],
                Status="Working - Contacted",
                Name={"LastName": "Lovelace"},
            ),
        ),
        (
            OPP,
            change(
                "Opportunity", "UNDELETE", [C], "tx-c2", T0 + 4 * HOUR, **opportunity("Qualification", 500)
            ),
        ),
        (OPP, change("Opportunity", "GAP_UPDATE", [D], "tx-gap", T0 + 5 * HOUR)),
        (
            OPP,
            change(
                "Opportunity",
                "UPDATE",
                [B],
                "tx-b1",
                T0 + 6 * HOUR,
                changed=["StageName", "IsClosed", "IsWon"],
                StageName="Closed Won",
                IsClosed=True,
                IsWon=True,
            ),
        ),
        (
            OPP,
            change(
                "Opportunity",
                "UPDATE",
                [C],
                "tx-c3",
                T0 + 7 * HOUR,
                changed=["Description", "CloseDate"],
                nulled=["CloseDate"],
                diff=["Description"],
                Description="@@ -1 +1 @@ long text diff",
            ),
        ),
    ]


def later() -> list[tuple[str, dict]]:
    """Changes made while the subscriber runs."""
    return [
        (
            OPP,
            change(
                "Opportunity",
                "UPDATE",
                [A],
                "tx-a3",
                T0 + 8 * HOUR,
                changed=["StageName", "Amount"],
                StageName="Closed Won",
                Amount=1700,
            ),
        ),
        (
            LEAD,
            change(
                "Lead",
                "UPDATE",
                [L1],
                "tx-l3",
                T0 + 9 * HOUR,
                changed=["Status", "IsConverted"],
                Status="Closed - Converted",
                IsConverted=True,
            ),
        ),
        (
            OPP,
            change(
                "Opportunity", "CREATE", [D], "tx-d1", T0 + 9 * HOUR, **opportunity("Needs Analysis", 250)
            ),
        ),
    ]


@pytest.fixture
def keys(tmp_path):
    cert, key = tls_files(tmp_path)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "jwt.key").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return {"cert": cert, "key": key, "public": public, "jwt": tmp_path / "jwt.key", "tls": context}


class Processes:
    """``funnel-kpi adapt`` and ``funnel-kpi salesforce-cdc`` as OS processes."""

    def __init__(self, broker_url: str, tmp_path, keys, pubsub: PubSubServer, oauth: OAuthServer) -> None:
        self.tmp_path = tmp_path
        self.base = {
            **{k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")},
            "FUNNEL_BROKER": broker_url,
            "FUNNEL_PARTITIONS": "4",
            "FUNNEL_WEB_BIND": "127.0.0.1",
        }
        self.cdc_port = free_port()
        self.cdc_env = {
            **self.base,
            **login_env(keys, oauth, pubsub),
            "FUNNEL_SALESFORCE_CDC_PORT": str(self.cdc_port),
            "FUNNEL_SALESFORCE_FETCH": str(FETCH),
            "FUNNEL_SALESFORCE_KEEPALIVE_TIMEOUT": "10",
            "FUNNEL_SALESFORCE_RECONNECT_MAX": "2",
        }
        self.started: list[subprocess.Popen] = []
        self.adapt_port = free_port()

    def _start(self, name: str, command: str, env: dict) -> subprocess.Popen:
        log = (self.tmp_path / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "streams.tools.cli", command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.started.append(process)
        return process

    def adapt(self) -> subprocess.Popen:
        return self._start("adapt", "adapt", {**self.base, "FUNNEL_ADAPT_PORT": str(self.adapt_port)})

    def cdc(self, channels: str = f"{OPP},{LEAD}") -> subprocess.Popen:
        return self._start("cdc", "salesforce-cdc", {**self.cdc_env, "FUNNEL_SALESFORCE_CHANNELS": channels})

    def cdc_metrics(self):
        return scrape(f"http://127.0.0.1:{self.cdc_port}/metrics")

    def adapt_metrics(self):
        return scrape(f"http://127.0.0.1:{self.adapt_port}/metrics")

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        for process in self.started:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture
def stack(broker, workers, tmp_path, keys):
    def start(**server):
        pubsub = PubSubServer(keys["cert"], keys["key"], **server).__enter__()
        oauth = OAuthServer(pubsub, keys["public"], keys["tls"]).__enter__()
        procs = Processes(broker.url, tmp_path, keys, pubsub, oauth)
        opened.append((pubsub, oauth, procs))
        worker = workers()
        procs.adapt()
        return pubsub, procs, worker

    opened: list = []
    yield start
    for pubsub, oauth, procs in opened:
        procs.stop()
        oauth.__exit__()
        pubsub.__exit__()


def raw_payloads(broker_url: str) -> list[dict]:
    return [json.loads(record.value)["data"]["payload"] for record in read(broker_url, "crm.raw.salesforce")]


def canonical(payloads: list[dict]) -> list[str]:
    return sorted(json.dumps(p, sort_keys=True) for p in payloads)


def samples_equal(worker, expected):
    return lambda: (s := worker.samples()) and worker_kpis(s) == expected and s


def store_replay(broker_url: str, channel: str, replay: int) -> None:
    """A replay id stored by an earlier run (the subscriber's own format)."""

    async def write():
        await topics.ensure_topics(
            broker_url, {REPLAY_TOPIC: 1}, replication_factor=1, configs={REPLAY_TOPIC: topics.COMPACTED}
        )
        value = json.dumps({"replay_id": replay.to_bytes(8, "big").hex(), "commit_timestamp": T0 - HOUR})
        await _produce(broker_url, REPLAY_TOPIC, [(f"{ORG[:15]}:{channel}".encode(), value.encode())])

    run_async(write())


def test_a_session_with_every_kind_of_change_gives_the_true_kpis(stack, broker):
    pubsub, procs, worker = stack(batch=2, keepalive=0.5)
    for channel, doc in session():
        pubsub.publish(channel, doc)
    pubsub.expire_before(OPP, 1000)  # the id stored below (999) is out of retention
    store_replay(broker.url, OPP, 999)
    pubsub.drops[OPP] = [5]  # the first Opportunity stream that delivers is dropped after 5 events
    worker.wait_ready()
    cdc = procs.cdc()
    docs = [doc for _, doc in session()]
    wait_until(
        samples_equal(worker, expected_kpis(docs)),
        120,
        what="the session's KPIs",
        show=lambda: (worker_kpis(worker.samples() or {}), procs.log("cdc")),
    )
    for channel, doc in later():  # live changes while it runs
        pubsub.publish(channel, doc)
    docs += [doc for _, doc in later()]
    expected = expected_kpis(docs)
    assert expected["won_revenue"] and expected["open"] and ("lifecycle", "won") in expected["closed"]
    samples = wait_until(
        samples_equal(worker, expected),
        90,
        what="the KPIs of every change",
        show=lambda: (worker_kpis(worker.samples() or {}), procs.log("cdc")),
    )
    assert cdc.poll() is None
    # every change event on the raw topic once, in the JSON the adapter reads (bitmaps as names)
    assert canonical(raw_payloads(broker.url)) == canonical(pubsub.expected)
    sent = procs.cdc_metrics()
    assert total(sent, "funnel_salesforce_cdc_events_total") == len(docs)
    assert total(sent, "funnel_salesforce_cdc_gaps_total", change_type="GAP_UPDATE") == 1
    assert total(sent, "funnel_salesforce_cdc_replay_fallbacks_total", channel=OPP) == 1
    assert total(sent, "funnel_salesforce_cdc_reconnects_total", channel=OPP) == 1  # the dropped stream
    assert total(sent, "funnel_salesforce_cdc_reconnects_total", channel=LEAD) == 0
    assert total(sent, "funnel_salesforce_cdc_connected") == 2
    assert pubsub.schema_calls == 2  # one GetSchema per schema id, then cached
    # the expired id, then EARLIEST (the fallback), then CUSTOM after the last id stored before the drop
    opp = [r for r in pubsub.subscribes if r.topic_name == OPP]
    assert [r.replay_preset for r in opp[:3]] == [2, 1, 2]
    delivered_before_drop = [r for r, _ in pubsub.log[OPP]][:5]
    assert int.from_bytes(opp[2].replay_id, "big") in delivered_before_drop[3:]  # the last one stored
    assert max(pubsub.requested) <= FETCH  # flow control: never asked for more than FETCH at once
    assert "funnel-kpi backfill salesforce --since 2025-11-03T14:00:00.000Z" in procs.log("cdc")
    bridge = procs.adapt_metrics()
    assert total(bridge, "funnel_adapt_gaps_total", source="salesforce") == 1
    assert total(bridge, "funnel_adapt_messages_total", outcome="dlq") == 0
    assert total(samples, "funnel_events_total", outcome="rejected") == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{procs.cdc_port}/healthz", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok", "channels": {OPP: "ok", LEAD: "ok"}}


def test_sigkill_mid_stream_and_a_restart_lose_and_double_nothing(stack, broker):
    pubsub, procs, worker = stack(batch=2, keepalive=0.5, pause=0.1)
    docs = []
    stages = ["Prospecting", "Qualification", "Needs Analysis", "Negotiation/Review", "Closed Won"]
    for n in range(40):
        deal = f"006SM00000030{n:02d}YAE"
        docs.append(
            change(
                "Opportunity",
                "CREATE",
                [deal],
                f"k{n}-0",
                T0 + n * HOUR,
                **opportunity(stages[0], 100 * (n + 1)),
            )
        )
        for step in range(1, n % 5 + 1):
            docs.append(
                change(
                    "Opportunity",
                    "UPDATE",
                    [deal],
                    f"k{n}-{step}",
                    T0 + n * HOUR + step * 60_000,
                    changed=["StageName"],
                    StageName=stages[step],
                )
            )
    for doc in docs:
        pubsub.publish(OPP, doc)
    expected = expected_kpis(docs)
    worker.wait_ready()
    first = procs.cdc(channels=OPP)
    wait_until(
        lambda: total(procs.cdc_metrics() or {}, "funnel_salesforce_cdc_events_total") >= 30,
        90,
        what="30 events written",
        show=lambda: procs.log("cdc"),
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    written = len(raw_payloads(broker.url))
    assert 30 <= written < len(docs)  # killed mid-stream
    procs.cdc(channels=OPP)
    samples = wait_until(
        samples_equal(worker, expected),
        150,
        what="the KPIs of every change counted once",
        show=lambda: (worker_kpis(worker.samples() or {}), procs.log("cdc")),
    )
    resumed = pubsub.subscribes[-1]
    assert resumed.replay_preset == 2  # CUSTOM: after the last id stored before the kill
    payloads = raw_payloads(broker.url)
    assert set(canonical(payloads)) == set(canonical(pubsub.expected))  # nothing lost
    assert len(payloads) - len(docs) <= FETCH  # at most what was in flight is sent again...
    # ...which the deal agent drops as duplicates (or stale): the KPIs above count each change once
    samples = wait_until(
        lambda: (s := worker.samples()) and total(s, "funnel_events_total") == len(payloads) and s,
        60,
        what="every raw message counted",
    )
    assert worker_kpis(samples) == expected
    assert total(samples, "funnel_events_total", outcome="accepted") <= len(docs)
    assert total(samples, "funnel_events_total", outcome="rejected") == 0


@pytest.mark.parametrize("order", ["backfill first", "subscriber first"])
def test_backfill_and_subscriber_in_either_order_equal_either_alone(stack, broker, tmp_path, keys, order):
    messages = [
        m
        for m in fixture("salesforce_session.json")["messages"]
        if m.get("data", {}).get("payload", m)["ChangeEventHeader"]["entityName"] == "Opportunity"
    ]
    live = live_events("salesforce")
    backfilled = []
    from .test_backfill_convergence import salesforce_backfill

    backfilled = salesforce_backfill()
    assert kpis(apply(live)[0]) == kpis(apply(backfilled)[0])  # either alone: the same funnel
    expected = expected_kpis(messages)
    pubsub, procs, worker = stack(batch=3, keepalive=0.5)
    for doc in messages:
        pubsub.publish(OPP, doc)
    env = {
        **procs.base,
        "FUNNEL_SALESFORCE_INSTANCE_URL": "",
        "FUNNEL_SALESFORCE_ACCESS_TOKEN": TOKEN,
        "FUNNEL_SALESFORCE_CA_BUNDLE": str(keys["cert"]),
        "FUNNEL_BACKFILL_STATE_DIR": str(tmp_path / "bf"),
    }
    worker.wait_ready()

    def counted(n):
        return lambda: total(worker.samples() or {}, "funnel_events_total") >= n

    with SalesforceServer(fixture("backfill_salesforce.json"), keys["tls"]) as rest:
        env["FUNNEL_SALESFORCE_INSTANCE_URL"] = rest.url

        def backfill():
            done = subprocess.run(
                [sys.executable, "-m", "streams.tools.cli", "backfill", "salesforce"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert done.returncode == 0, done.stderr[-2000:]

        if order == "backfill first":
            backfill()
            wait_until(counted(len(backfilled)), 60, what="the backfill counted")
            procs.cdc(channels=OPP)
        else:
            procs.cdc(channels=OPP)
            wait_until(counted(len(live)), 60, what="the live session counted")
            backfill()
        wait_until(counted(len(live) + len(backfilled)), 90, what="both counted")
    wait_until(
        samples_equal(worker, expected),
        60,
        what="the KPIs of either alone",
        show=lambda: (worker_kpis(worker.samples() or {}), procs.log("cdc")),
    )
