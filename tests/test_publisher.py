"""The KPI publisher's outputs stay safe across fleets, failed writes and kills: snapshots of a
rebuild under a new app id outrank the old fleet's, a generation is never reused, conversion-drop
alerts are at least once with one id, and a worker adopts the stream clock only from its own
fleet. No broker: the worker's batch step runs against a broker stand-in that can refuse a
topic or die mid-batch."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import orjson
import pytest
from aiokafka.errors import KafkaError

from models import aggregates as agg
from models.alerts import iso
from models.config import FunnelConfig, load_config
from models.fold import Fold
from processors.records import Record
from streams.http.api import SnapshotFeed
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.worker.loop import Batch
from streams.worker.publisher import KpiPublisher, encode_partial
from streams.worker.step import publisher_key

FLEET_HEADER = "funnel.fleet"  # a contract (docs/consuming.md): spelled out, not imported
DROP = {("default", "mql"): {"7d": 40, "90d": 440}, ("default", "sql"): {"7d": 8, "90d": 208}}
CHANGELOG = "changelog"


def partials(as_of: int, lifetime_value: float = 100, reached: dict | None = None,
             group_generation: int = 0) -> list[bytes]:
    """Partition 0's two partials: one customer's lifetime value, the reached counts given."""
    rows = [["funnel_deals_reached_window", {"pipeline": pl, "stage": stage, "window": w}, n]
            for (pl, stage), windows in (reached or {}).items() for w, n in windows.items()]
    top = [["default", "USD", "Acme", lifetime_value * 1_000_000]]
    return [orjson.dumps(["deals", 0, as_of, rows, [], 0, group_generation]),
            orjson.dumps(["customers", 0, as_of, [], top, 0, group_generation])]


def pair(snapshot: dict) -> tuple[int, int]:
    return snapshot["generation"], snapshot["sequence"]


def default(snapshots: list[dict]) -> list[dict]:
    return [s for s in snapshots if s["pipeline"] == "default"]


def dropped(as_of: int) -> list[bytes]:
    return partials(as_of, reached=DROP)


def records(values: list[bytes]) -> list[Record]:
    return [Record(None, value, "partials", 0, offset) for offset, value in enumerate(values)]


# -- the publishing agent against a broker stand-in that refuses or dies --------------------------


class Killed(BaseException):
    """The worker process dies here (nothing after it runs)."""


class BrokerStandIn:
    """What the broker acknowledged: messages per topic and the publisher's changelog (a
    worker that starts recovers its table from it)."""

    def __init__(self, changelog: dict[str, bytes | None] | None = None) -> None:
        self.acknowledged: dict[str, list[tuple[bytes, bytes, list]]] = defaultdict(list)
        self.attempted: dict[str, list[bytes]] = defaultdict(list)
        self.changelog = dict(changelog or {})

    def alert_ids(self, attempted: bool = False) -> list[str]:
        messages = (self.attempted[topics.ALERTS] if attempted else
                    [value for _, value, _ in self.acknowledged[topics.ALERTS]])
        return [orjson.loads(value)["id"] for value in messages]

    def snapshots(self) -> list[dict]:
        return [orjson.loads(value) for _, value, _ in self.acknowledged[topics.KPIS]]


class StateTable:
    """The publisher table's store, as the worker reads it."""

    def __init__(self, store: dict[str, bytes | None]) -> None:
        self.store = store

    def read(self, key: str) -> bytes | None:
        return self.store.get(key)


class OutboxStandIn:
    """The worker's outbox against :class:`BrokerStandIn`: each message is acknowledged or
    refused on its own; the store takes the table writes once all of a flush are acknowledged.
    ``refuse``: topic → how many sends to refuse. ``kill``: ``"before alerts"`` dies in the flush
    holding alerts once everything else of it is acknowledged; ``"after alerts"`` dies right
    after the flush holding alerts."""

    def __init__(self, broker: BrokerStandIn, table: StateTable, refuse: dict[str, int] | None = None,
                 kill: str | None = None) -> None:
        self.broker, self.table = broker, table
        self.refuse = dict(refuse or {})
        self.kill = kill
        self.pending: list[tuple[str, str | bytes | None, bytes | None, list | None]] = []

    def put(self, table, key: str, value: bytes | None, partition: int) -> None:
        self.pending.append((CHANGELOG, key, value, None))

    def send(self, topic: str, key: bytes | None, value: bytes, *, sink: str,
             partition: int | None = None, headers: list | None = None) -> None:
        self.pending.append((topic, key, value, headers))

    def discard(self) -> None:
        self.pending.clear()

    async def flush(self, fence=lambda: True, trailers=None) -> None:
        pending, self.pending = self.pending, []
        has_alerts = any(topic == topics.ALERTS for topic, *_ in pending)
        if has_alerts and self.kill == "before alerts":
            for topic, key, value, headers in pending:
                self.broker.attempted[topic].append(value)
                if topic != topics.ALERTS:
                    self._deliver(topic, key, value, headers)
            raise Killed
        failed = None
        for topic, key, value, headers in pending:
            self.broker.attempted[topic].append(value)
            if self.refuse.get(topic, 0) > 0:
                self.refuse[topic] -= 1
                failed = KafkaError(f"{topic} refused")
                continue
            self._deliver(topic, key, value, headers)
        if failed is not None:
            raise failed
        self.table.store.update((key, value) for topic, key, value, _ in pending if topic == CHANGELOG)
        if has_alerts and self.kill == "after alerts":
            raise Killed

    def _deliver(self, topic, key, value, headers) -> None:
        if topic == CHANGELOG:
            self.broker.changelog[key] = value
        else:
            self.broker.acknowledged[topic].append((key, value, headers or []))


def start_worker(broker: BrokerStandIn, app_id: str = "fleet-a", **faults):
    """A worker process that owns partition 0, so it publishes; its publisher state is
    recovered from the broker's changelog of the deals table."""
    from streams.worker.app import FunnelWorker

    worker = FunnelWorker(Settings(app_id=app_id, partitions=1))
    state = StateTable({key if key.startswith("\x00") else publisher_key(key): value
                        for key, value in broker.changelog.items()})
    worker.outbox = OutboxStandIn(broker, state, **faults)
    worker.deals, worker.customers = state, StateTable({})
    step = worker.loop.handle  # the worker's batch step, writing to the stand-ins
    step.out, step.tables = worker.outbox, {"deals": state, "customers": worker.customers}
    worker.loop.epoch = 0  # the group generation the partials below were sent in
    return worker


def run_publisher(worker, batches: list[list[bytes]]) -> None:
    """Each batch of partials through the worker's batch step; a batch that fails is simply
    followed by the next one (same worker, same publisher), as the batch loop does."""
    step = worker.loop.handle
    partials_topic = worker.partials_topic.get_topic_name()
    for batch in batches:
        records = {topics.EVENTS: [], worker.credits_topic.get_topic_name(): [], topics.ERASURES: [],
                   partials_topic: [Record(None, value, partials_topic, 0, offset)
                                    for offset, value in enumerate(batch)]}
        try:
            asyncio.run(step(Batch(0, records, {}, [])))
        except Exception:
            continue


def test_a_rebuild_under_a_new_app_id_outranks_the_old_fleets_snapshots():
    # The old fleet ran for a while: seven publisher take-overs, three snapshots in the last.
    old = BrokerStandIn(changelog={"generation": b"6"})
    run_publisher(start_worker(old, "funnel-kpi"), [partials(t, lifetime_value=t) for t in (1, 2, 3)])
    new = BrokerStandIn()  # new app id: empty tables
    run_publisher(start_worker(new, "funnel-kpi-v2"), [partials(4)])
    old_last, new_first = default(old.snapshots())[-1], default(new.snapshots())[0]
    feed = SnapshotFeed()
    assert feed.offer(orjson.dumps(old_last))
    assert feed.offer(orjson.dumps(new_first)), (
        f"the new fleet's first snapshot {pair(new_first)} is dropped after the old fleet's "
        f"{pair(old_last)}")


def test_a_later_take_over_in_the_old_fleet_never_outranks_the_new_fleet():
    # While both run (and when the old workers are stopped one by one) the old fleet's
    # publisher can move after the new fleet's first claim.
    old, new = BrokerStandIn(), BrokerStandIn()
    run_publisher(start_worker(old, "funnel-kpi"), [partials(1)])
    time.sleep(0.002)
    run_publisher(start_worker(new, "funnel-kpi-v2"), [partials(2)])
    run_publisher(start_worker(old, "funnel-kpi"), [partials(3)])  # the old fleet's publisher moved
    new_first, old_again = default(new.snapshots())[0], default(old.snapshots())[-1]
    assert pair(old_again) < pair(new_first)


def test_within_a_fleet_each_new_publisher_takes_the_next_generation():
    broker = BrokerStandIn()
    started_ms = int(time.time() * 1000)
    run_publisher(start_worker(broker), [partials(1), partials(2, lifetime_value=50)])
    pairs = [pair(s) for s in default(broker.snapshots())]
    generation = pairs[0][0]
    assert generation >= started_ms  # a fleet's first claim: the wall clock
    assert [g for g, _ in pairs] == [generation, generation] and pairs == sorted(set(pairs))
    run_publisher(start_worker(broker), [partials(3)])  # the next publisher of the fleet
    assert pair(default(broker.snapshots())[-1]) == (generation + 1, 1)


# -- 2. never a reused generation, drop alerts at least once -------------------------------------


def test_a_generation_is_never_reused_for_different_content_after_a_failed_write():
    broker = BrokerStandIn()
    first = start_worker(broker, refuse={CHANGELOG: 1})  # the claim of its generation is lost
    run_publisher(first, [partials(1, lifetime_value=100), partials(2, lifetime_value=40)])
    survivor = start_worker(broker)  # takes over publishing: recovers the table from the changelog
    run_publisher(survivor, [partials(3, lifetime_value=70)])
    contents: dict[tuple, set] = defaultdict(set)
    for snapshot in broker.snapshots():
        if snapshot["pipeline"] == "default":
            contents[(snapshot["generation"], snapshot["sequence"])].add(
                snapshot["customers"]["top"][0]["lifetime_value"])
    reused = {pair: values for pair, values in contents.items() if len(values) > 1}
    assert not reused, f"pairs published with different content: {reused}"
    assert 70 in {value for values in contents.values() for value in values}


def test_a_drop_alert_whose_send_is_refused_goes_out_from_the_next_publisher_with_its_id():
    broker = BrokerStandIn()
    first = start_worker(broker, refuse={topics.ALERTS: 1})
    run_publisher(first, [dropped(1)])
    [tried] = broker.alert_ids(attempted=True)
    assert broker.alert_ids() == []
    survivor = start_worker(broker)  # the publisher moved before the next partials
    run_publisher(survivor, [dropped(2), dropped(3)])
    assert broker.alert_ids() == [tried]


def test_a_drop_alert_refused_once_goes_out_on_the_next_partials():
    broker = BrokerStandIn()
    worker = start_worker(broker, refuse={topics.ALERTS: 1})
    run_publisher(worker, [dropped(1), dropped(2), dropped(3)])
    [tried, _] = broker.alert_ids(attempted=True)
    assert broker.alert_ids() == [tried]


@pytest.mark.parametrize("kill", ["before alerts", "after alerts"])
def test_a_kill_around_the_drop_alert_sends_it_again_after_the_restart_with_the_same_id(kill):
    broker = BrokerStandIn()
    first = start_worker(broker, kill=kill)
    with pytest.raises(Killed):
        run_publisher(first, [dropped(1)])
    [tried] = broker.alert_ids(attempted=True)
    restarted = start_worker(broker)
    run_publisher(restarted, [dropped(2), dropped(3)])
    delivered = broker.alert_ids()
    assert delivered and set(delivered) == {tried}, f"{tried!r} not re-sent as such: {delivered}"


def test_a_check_redone_for_the_same_drop_keeps_its_id_and_the_next_drop_gets_a_new_one():
    broker = BrokerStandIn()
    worker = start_worker(broker)
    healthy = {("default", "mql"): {"7d": 40, "90d": 440}, ("default", "sql"): {"7d": 20, "90d": 220}}
    run_publisher(worker, [dropped(1), dropped(2), partials(3, reached=healthy), dropped(4)])
    alerts = [orjson.loads(value) for _, value, _ in broker.acknowledged[topics.ALERTS]]
    assert [a["type"] for a in alerts] == ["conversion.drop", "conversion.recovered",
                                          "conversion.drop"]
    assert len({a["id"] for a in alerts}) == 3


def test_a_fleet_rebuilt_under_the_same_app_id_never_reuses_the_old_fleets_alert_ids():
    # Same app id after deleting the internal topics (docs/operations.md): the table is empty.
    old, new = BrokerStandIn(), BrokerStandIn()
    run_publisher(start_worker(old), [dropped(1)])
    time.sleep(0.002)
    run_publisher(start_worker(new), [dropped(1)])
    assert old.alert_ids() and new.alert_ids() and old.alert_ids() != new.alert_ids()


def test_snapshots_carry_the_publishing_fleet_in_a_header():
    broker = BrokerStandIn()
    run_publisher(start_worker(broker, app_id="funnel-kpi-v2"), [partials(1)])
    headers = {tuple(h) for _, _, hs in broker.acknowledged[topics.KPIS] for h in hs}
    assert headers == {(FLEET_HEADER, b"funnel-kpi-v2")}


# -- the fleet clock ----------------------------------------------------------------------------


def snapshot_json(as_of_ms: int, generation: int) -> bytes:
    """A valid snapshot of pipeline ``default`` at ``as_of_ms``."""
    out = KpiPublisher(load_config(), partitions=1, version="t").process(
        records(partials(as_of_ms)), lambda key, record: None, 0)
    [snapshot] = [s for s in out.snapshots if s.pipeline == "default"]
    return snapshot.model_copy(update={"generation": generation, "as_of": iso(as_of_ms)}) \
        .model_dump_json().encode()


def test_a_worker_adopts_the_stream_clock_only_from_its_own_fleets_snapshots():
    from streams.worker.app import FunnelWorker

    worker = FunnelWorker(Settings(app_id="funnel-kpi-v2", partitions=1, clock="stream"))
    old_fleet_ahead = snapshot_json(as_of_ms=1_900_000_000_000, generation=10**13)
    worker.feed.offer(old_fleet_ahead)  # an old fleet's, sent before snapshots named their fleet
    assert worker.clock.now_ms() == 0, "adopted the clock of another fleet's snapshot"
    worker.feed.offer(snapshot_json(as_of_ms=1_900_000_000_001, generation=10**13), "funnel-kpi")
    assert worker.clock.now_ms() == 0
    # Its own fleet's snapshots, though another fleet's pair is higher (both served while they
    # overlap): adopted.
    worker.feed.offer(snapshot_json(as_of_ms=1_700_000_000_000, generation=5), "funnel-kpi-v2")
    assert worker.clock.now_ms() == 1_700_000_000_000
    assert worker.feed.latest["default"].generation == 10**13


# -- KPIs per dimension value ---------------------------------------------------------------------


def region_fold(*deals: tuple[str, str, str, int, int, str]) -> Fold:
    """A deals fold of one deal per (region, stage, currency, amount, cycle days, furthest
    open stage), as the deals processor folds them."""
    fold = Fold()
    sums = fold.counters.setdefault(agg.DIMENSION, {})
    for region, stage, currency, amount, days, furthest in deals:
        key = ("default", (region,), stage, currency, furthest)
        sums[key] = sums.get(key, 0) + agg.pack_dimension(1, days * 86_400_000, amount * agg.MICRO)
    return fold


def test_a_snapshot_sums_every_partitions_dimension_samples():
    """Partials carry the exporter's per-value samples; the snapshot divides their sums, and the
    API takes and serves it."""
    config = FunnelConfig.model_validate({**load_config().model_dump(),
                                          "dimensions": {"region": {"max_values": 2}}})
    folds = {0: region_fold(("eu", "mql", "USD", 100, 0, "mql"), ("eu", "mql", "USD", 100, 0, "mql"),
                            ("eu", "won", "USD", 500, 10, "opportunity"),
                            ("us", "lost", "USD", 9, 5, "sql")),
             1: region_fold(("us", "won", "EUR", 800, 20, "opportunity"),
                            ("eu", "lead", "USD", 50, 0, "lead"), ("none", "lead", "USD", 0, 0, "lead"))}
    values = [encode_partial(kind, partition, 1_000, config, fold if kind == "deals" else Fold())
              for partition, fold in folds.items() for kind in ("deals", "customers")]
    out = KpiPublisher(config, partitions=2, version="t").process(records(values), lambda k, r: None, 0)
    [snapshot] = [s for s in out.snapshots if s.pipeline == "default"]
    eu, us, none, other = snapshot.dimensions["region"]
    assert [v.value for v in (eu, us, none, other)] == ["eu", "us", "none", "other"]
    assert (eu.deals, eu.open_deals, eu.open_value, eu.won, eu.won_revenue) == (4, 3, 250, 1, 500)
    assert [(s.reached, s.conversion_to_next) for s in eu.stages] == [
        (4, 0.75), (3, 1 / 3), (1, 1.0), (1, None)]
    assert eu.avg_sales_cycle_seconds == 10 * 86400
    # a won EUR deal: counted, its cycle too, but no USD revenue nor deal size
    assert (us.won, us.lost, us.win_rate, us.won_revenue, us.avg_deal_size) == (1, 1, 0.5, 0, None)
    assert us.avg_sales_cycle_seconds == 20 * 86400
    assert (none.deals, other.deals) == (1, 0)
    feed = SnapshotFeed()
    assert feed.offer(snapshot.model_dump_json().encode())
    assert feed.latest["default"].dimensions == snapshot.dimensions
