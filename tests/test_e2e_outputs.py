"""KPI outputs end to end (real broker, real Redis, real worker processes): snapshots on
funnel.kpis, Redis and GET /kpis agree with the batch values; Redis outages never touch the
pipeline; the publisher fails over with increasing (generation, sequence), a rebuild under a new
app id takes over from the old fleet, and Redis never takes an older snapshot over a newer one."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

import jsonschema
import orjson
import pytest
import redis
from aiokafka import AIOKafkaProducer

from models.config import load_config
from models.kpis import pipeline_kpis, total
from models.schemas import SCHEMA_DIR
from models.snapshot import RepRevenue, TeamRevenue, build_snapshot
from sinks.redis import RedisSink
from streams.kafka import topics
from streams.tools.broker import free_port, wait_for_port
from streams.tools.simulator import Simulation

from .conftest import DATASET_EVENTS, batch_team_revenue, credits_settled, settled, team_config, wait_until
from .test_e2e_pipeline import dataset_events, read_topic, replay
from .test_reliability_crash import stored_positions

pytestmark = pytest.mark.broker
SNAPSHOT_SCHEMA = json.loads((SCHEMA_DIR / "kpi-snapshot.v1.json").read_text())


def assert_snapshot_is_the_dataset(snapshot):
    jsonschema.Draft202012Validator(SNAPSHOT_SCHEMA).validate(snapshot)
    kpis = snapshot["all_time"]
    stages = {row["stage"]: row for row in snapshot["stages"]}
    assert (stages["sql"]["open"], stages["opportunity"]["open"]) == (500, 1589)
    assert (stages["sql"]["open_value"], stages["opportunity"]["open_value"]) == (1_073_986, 3_892_229)
    assert (kpis["won"], kpis["lost"], kpis["won_revenue"]) == (4238, 2473, 10_005_534)
    assert round(kpis["avg_deal_size"], 2) == 2360.91  # money: the API rounds it to cents
    assert round(kpis["avg_sales_cycle_seconds"] / 86400, 3) == 51.782
    assert snapshot["customers"]["count"] == 85
    assert round(snapshot["customers"]["avg_lifetime_value"], 2) == 117_712.16
    assert snapshot["leaderboard"][0] == {"owner": "Darcel Schlecht", "won_revenue": 1_153_214}
    assert stages["opportunity"]["stalled"] == 1571


def latest_accepted(messages):
    """What a consumer keeps: per pipeline, only snapshots whose pair increases."""
    latest, accepted = {}, []
    for message in messages:
        snapshot = orjson.loads(message.value)
        pair = (snapshot["generation"], snapshot["sequence"])
        current = latest.get(snapshot["pipeline"])
        if current is None or pair > (current["generation"], current["sequence"]):
            latest[snapshot["pipeline"]] = snapshot
            accepted.append((snapshot["pipeline"], pair))
    return latest, accepted


def http_json(url):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def snapshot_matches_metrics(base, worker):
    """The API's snapshot shows what /metrics shows now. Snapshots are built from partials sent
    every tick, so one taken during the replay's last seconds can match on some KPIs (won deals)
    and not yet on others (the last open deals, customer credits): compare them all."""
    def check():
        samples = worker.samples()
        try:
            snapshot = http_json(f"{base}/kpis/default")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # the API's answer until the first snapshot is published
                return None
            raise
        kpis = pipeline_kpis(samples, "default", "USD")
        now = (kpis.won, sum(row.open for row in kpis.stages), kpis.customers,
               round(kpis.avg_customer_lifetime_value or 0, 2))
        shown = (snapshot["all_time"]["won"], sum(row["open"] for row in snapshot["stages"]),
                 snapshot["customers"]["count"],
                 round(snapshot["customers"]["avg_lifetime_value"] or 0, 2))
        return snapshot if credits_settled(samples) and now == shown else None
    return check


def assert_teams_are_the_batch(snapshot):
    """Managers as teams (conftest.team_config): each team's won revenue is the batch figure
    from the CSV files, exactly, largest first."""
    expected = batch_team_revenue()
    assert {row["team"]: row["won_revenue"] for row in snapshot["teams"]} == expected
    assert [row["won_revenue"] for row in snapshot["teams"]] == sorted(expected.values(), reverse=True)


def test_snapshot_on_topic_redis_and_api_equal_the_batch_values(broker, workers, redis_server, tmp_path):
    store = redis.Redis(host="127.0.0.1", port=redis_server.port)
    worker = workers(FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1",
                     FUNNEL_REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/0",
                     FUNNEL_CONFIG=str(team_config(tmp_path / "funnel-teams.yaml")))
    worker.wait_ready()
    replay(broker, dataset_events())
    settled([worker], DATASET_EVENTS)
    base = f"http://127.0.0.1:{worker.port}"
    wait_until(lambda: snapshot_matches_metrics(base, worker)(), 60, what="snapshot caught up")
    time.sleep(2)
    api = http_json(f"{base}/kpis/default")
    assert_snapshot_is_the_dataset(api)
    assert_teams_are_the_batch(api)
    board = http_json(f"{base}/kpis/default/leaderboard")
    assert (board["leaderboard"], board["teams"]) == (api["leaderboard"], api["teams"])
    latest, _ = latest_accepted(read_topic(broker, topics.KPIS, lambda found: False, timeout=4))
    assert_snapshot_is_the_dataset(latest["default"])
    assert_teams_are_the_batch(latest["default"])
    assert (latest["default"]["generation"], latest["default"]["sequence"]) == (
        api["generation"], api["sequence"])
    stored = wait_until(lambda: store.get("funnel:kpis:default"), 10, what="Redis snapshot")
    assert_snapshot_is_the_dataset(json.loads(stored))
    assert_teams_are_the_batch(json.loads(stored))
    assert store.zrevrange("funnel:leaderboard:default", 0, 0, withscores=True) == [
        (b"Darcel Schlecht", 1_153_214.0)]
    teams = store.zrange("funnel:teams:default", 0, -1, withscores=True)
    assert {member.decode(): score for member, score in teams} == batch_team_revenue()
    clv = {k.decode(): float(v) for k, v in store.hgetall("funnel:clv:default").items()}
    assert len(clv) == 85 and round(sum(clv.values())) == 10_005_534
    alerts = store.xrange("funnel:alerts")
    assert len({json.loads(fields[b"alert"])["id"] for _, fields in alerts}) >= 1571
    # A consumer built with another Kafka client (librdkafka) reads the same messages.
    pairs = read_with_librdkafka(broker.url.split("//")[1], topics.KPIS)
    assert {key for key, _ in pairs} >= {b"default"}
    other_latest = max((json.loads(value) for key, value in pairs if key == b"default"),
                       key=lambda s: (s["generation"], s["sequence"]))
    assert other_latest == latest["default"]


def read_with_librdkafka(bootstrap, topic, idle=3.0):
    """confluent-kafka, no consumer group: assign every partition from the beginning."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "other-client",
                         "enable.auto.commit": False})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        found, last = [], time.monotonic()
        while time.monotonic() - last < idle:
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                found.append((message.key(), message.value()))
                last = time.monotonic()
        return found
    finally:
        consumer.close()


class RedisServer:
    """A Redis of its own on a free port, so the test can stop and start it."""

    def __init__(self, workdir):
        self.port = free_port()
        self.workdir = workdir
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path):
    """A Redis of the test's own: the worker writes fixed ``funnel:`` keys, which tests run at
    the same time (in other processes, or another checkout's run) would share on 6379."""
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def stored_events(broker):
    """How far the worker's position rows say it has read crm.events, over all partitions."""
    return sum(stored_positions(broker.url).values())


def test_redis_outage_never_stops_the_pipeline_and_redis_catches_up(broker, workers, tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        worker = workers(FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1",
                         FUNNEL_REDIS_URL=f"redis://127.0.0.1:{server.port}/0")
        worker.wait_ready()
        server.stop()  # Redis is down for the whole replay
        feeder = threading.Thread(target=replay, args=(broker, dataset_events(), 4000.0))
        feeder.start()
        progress = []
        while feeder.is_alive():  # the worker goes on counting events while Redis is down
            time.sleep(0.5)
            progress.append(total(worker.samples() or {}, "funnel_events_total"))
        feeder.join()
        settled([worker], DATASET_EVENTS)
        wait_until(lambda: stored_events(broker) >= DATASET_EVENTS, 30, what="all positions stored")
        assert progress[-1] > progress[0], f"events not counted while Redis was down: {progress}"
        assert total(worker.samples(), "funnel_sink_errors_total", sink="redis") > 0
        assert "Redis write failed" in worker.log_tail(400)
        base = f"http://127.0.0.1:{worker.port}"
        # Reported, but an optional output never takes the worker out of service.
        assert http_json(f"{base}/readyz") == {"status": "ready", "tables": "recovered",
                                               "broker": "ok", "redis": "unreachable"}
        server.start()
        wait_until(lambda: snapshot_matches_metrics(base, worker)(), 60, what="snapshot caught up")
        store = redis.Redis(host="127.0.0.1", port=server.port)

        def redis_has_latest():
            stored = store.get("funnel:kpis:default")
            api = http_json(f"{base}/kpis/default")
            if not stored:
                return False
            snapshot = json.loads(stored)
            return (snapshot["generation"], snapshot["sequence"]) == (api["generation"], api["sequence"])

        wait_until(redis_has_latest, 60, what="Redis caught up with the latest snapshot")
        assert_snapshot_is_the_dataset(json.loads(store.get("funnel:kpis:default")))
        wait_until(lambda: http_json(f"{base}/readyz")["redis"] == "ok", 10, what="Redis ok")
    finally:
        server.stop()


def test_publisher_fails_over_with_increasing_pairs(broker, workers):
    env = {"FUNNEL_CLOCK": "stream", "FUNNEL_TICK_INTERVAL": "1", "FUNNEL_STANDBY_REPLICAS": "1"}
    first = workers("w1", **env)
    first.wait_ready()
    second = workers("w2", **env)
    def both_ready():
        # Both must own partitions: a replay started while the second is still joining runs
        # through a rebalance, and the kill then lands in the middle of it.
        samples = [w.samples() or {} for w in (first, second)]
        return (all(total(s, "funnel_worker_ready") == 1 for s in samples)
                and [total(s, "funnel_active_partitions") for s in samples] == [2, 2])

    wait_until(both_ready, 120, what="two ready workers owning the four partitions")
    replay(broker, dataset_events())
    settled([first, second], DATASET_EVENTS)
    publishers = wait_until(
        lambda: [w for w in (first, second) if total(w.samples(), "funnel_kpi_publisher") == 1],
        30, what="a publisher")
    assert len(publishers) == 1
    publisher = publishers[0]
    survivor = second if publisher is first else first
    before, _ = latest_accepted(read_topic(broker, topics.KPIS, lambda found: False, timeout=3))
    killed_at = time.monotonic()
    publisher.kill()
    # Within 30 s (5 session timeouts): liveness, not speed (timings belong in bench/; on a quiet
    # box it takes the 6 s session timeout + a tick and a rebalance, ~10-15 s).
    wait_until(lambda: total(survivor.samples(), "funnel_kpi_publisher") == 1, 30,
               what="the survivor publishes")
    print(f"publisher take-over after a kill: {time.monotonic() - killed_at:.1f} s")

    def new_generation(found):
        latest, _ = latest_accepted(found)
        return latest.get("default", {}).get("generation", 0) > before["default"]["generation"]

    messages = read_topic(broker, topics.KPIS, new_generation, timeout=60)
    latest, accepted = latest_accepted(messages)
    pairs = [pair for pipeline, pair in accepted if pipeline == "default"]
    assert pairs == sorted(set(pairs))
    assert latest["default"]["generation"] > before["default"]["generation"]
    assert_snapshot_is_the_dataset(latest["default"])
    assert os.environ.get("FUNNEL_API_TOKEN") is None


def made_snapshot(generation, sequence, leader, as_of_ms=0):
    """A valid snapshot of pipeline ``default`` whose leaderboard, team leaderboard and top
    customer are ``leader``."""
    snapshot = build_snapshot({}, load_config(), "default", as_of_ms=as_of_ms, generated_ms=as_of_ms,
                              generation=generation, sequence=sequence, partitions=4,
                              top_customers=[(leader, 1000.0)])
    return snapshot.model_copy(update={"leaderboard": [RepRevenue(owner=leader, won_revenue=1000.0)],
                                       "teams": [TeamRevenue(team=leader, won_revenue=1000.0)]})


async def written_by_its_own_sink(url, prefix, snapshot):
    """One publisher's Redis sink writes ``snapshot`` (each publisher has its own)."""
    errors = []
    sink = RedisSink(url, lambda: errors.append(1), prefix=prefix)
    sink.snapshot(snapshot)
    task = asyncio.create_task(sink.run())
    try:
        while sink.snapshots and not errors:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await sink.close()
    assert not errors


def test_redis_never_takes_an_older_snapshot_over_a_newer_one():
    url, prefix = "redis://127.0.0.1:6379/12", f"test-{uuid.uuid4().hex}"
    store = redis.Redis.from_url(url)

    def stored():
        snapshot = json.loads(store.get(f"{prefix}:kpis:default"))
        return ((snapshot["generation"], snapshot["sequence"]),
                [m.decode() for m in store.zrange(f"{prefix}:leaderboard:default", 0, -1)],
                [f.decode() for f in store.hkeys(f"{prefix}:clv:default")],
                [m.decode() for m in store.zrange(f"{prefix}:teams:default", 0, -1)])

    def write(snapshot):
        asyncio.run(written_by_its_own_sink(url, prefix, snapshot))

    try:
        # A rebuild's first snapshot, then the old fleet's last one, delivered late (its sink
        # waited for Redis, or the old fleet still runs beside the new one).
        write(made_snapshot(1_796_000_000_000, 1, "new fleet"))
        write(made_snapshot(7, 500, "old fleet"))
        assert stored() == ((1_796_000_000_000, 1), ["new fleet"], ["new fleet"], ["new fleet"])
        # Within a fleet: a previous publisher's snapshot after its successor's.
        write(made_snapshot(1_796_000_000_001, 2, "successor"))
        write(made_snapshot(1_796_000_000_000, 9, "predecessor"))
        write(made_snapshot(1_796_000_000_001, 1, "earlier of the successor"))
        assert stored() == ((1_796_000_000_001, 2), ["successor"], ["successor"], ["successor"])
        write(made_snapshot(1_796_000_000_001, 3, "next"))
        assert stored() == ((1_796_000_000_001, 3), ["next"], ["next"], ["next"])
        # a snapshot without teams (none configured) leaves no team leaderboard behind
        write(made_snapshot(1_796_000_000_001, 4, "no teams").model_copy(update={"teams": None}))
        assert stored() == ((1_796_000_000_001, 4), ["no teams"], ["no teams"], [])
    finally:
        store.delete(*(f"{prefix}:{kind}:default" for kind in ("kpis", "leaderboard", "clv", "teams")))
        store.close()


def produce_raw(broker, topic, key, value):
    async def send():
        producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap_servers(broker.url))
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()
    asyncio.run(send())


def test_a_rebuild_under_a_new_app_id_serves_its_own_snapshots_and_keeps_its_own_clock(broker, workers):
    worker = workers(FUNNEL_APP_ID="funnel-kpi-v2", FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1")
    worker.wait_ready()
    # The old fleet's last snapshot (a version before snapshots named their fleet): seven
    # publisher take-overs, its stream clock pushed to 2030 by an event its producer stamped.
    old_last = made_snapshot(7, 500, "old fleet", as_of_ms=1_900_000_000_000)
    produce_raw(broker, topics.KPIS, b"default", old_last.model_dump_json().encode())
    replay(broker, Simulation(seed=3, deals=100, days=30, end=1_700_000_000).events())
    base = f"http://127.0.0.1:{worker.port}"

    def served():
        clock = total(worker.samples(), "funnel_clock_timestamp_seconds")
        try:
            snapshot = http_json(f"{base}/kpis/default")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # nothing read from funnel.kpis yet
                return None, None, None, clock
            raise
        return snapshot["generation"], snapshot["as_of"], snapshot["leaderboard"][:1], clock

    def own_snapshot_and_clock():
        generation, _, _, clock = served()
        return generation not in (None, 7) and 1_600_000_000 < clock <= 1_700_000_000

    wait_until(own_snapshot_and_clock, 60, show=served,
               what="the new fleet's own snapshot on /kpis and its own stream clock")
    latest, _ = latest_accepted(read_topic(broker, topics.KPIS, lambda found: False, timeout=3))
    assert latest["default"]["generation"] > 7  # what every consumer of funnel.kpis keeps
