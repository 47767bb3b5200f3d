"""Failure paths against the real broker and worker processes (issue 18): stall alerts at least
once, a customer with more won deals than a message can hold, a batch held past the rebalance
timeout or frozen while the group moves on, a recovery overtaken by a join, the fleet's stream
clock."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from datetime import UTC, datetime

import orjson
import pytest

from models.deal_codec import decode_deal, encode_deal
from models.kpis import total
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.tools.dataset import dataset_deals
from streams.tools.producer import produce

from .conftest import DATASET, credits_settled, exported_once, exported_partitions, merged, wait_until
from .test_e2e_pipeline import assert_dataset_values, dataset_events, read_topic, replay
from .test_reliability_crash import APP_ID, read_all

pytestmark = pytest.mark.broker


def stalling_events():
    """A lead entered on 1 January and another deal's event on 10 February: with the stream
    clock the first one is 40 days in ``lead`` (stall_after 30d) at the next tick."""
    return [
        {"event_id": "s1", "deal_id": "stalled-deal", "source": "api", "stage": "lead",
         "occurred_at": "2024-01-01T00:00:00Z", "amount": 10.0},
        {"event_id": "f1", "deal_id": "fresh-deal", "source": "api", "stage": "lead",
         "occurred_at": "2024-02-10T00:00:00Z", "amount": 20.0},
    ]


def stall_alerts(broker, timeout):
    found = read_topic(broker, topics.ALERTS, lambda messages: any(
        orjson.loads(m.value)["type"] == "deal.stalled" for m in messages), timeout=timeout)
    return [alert for alert in (orjson.loads(m.value) for m in found)
            if alert["type"] == "deal.stalled"]


def stalled_in_the_table(worker):
    samples = worker.samples()
    return samples is not None and total(samples, "funnel_deals_stalled", stage="lead") == 1


def test_a_stall_alert_whose_send_fails_goes_out_on_the_retry(broker, workers):
    worker = workers(FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1", module="tests.faults",
                     FAULT_FAIL_ALERT_SENDS="1")
    worker.wait_ready()
    replay(broker, stalling_events())
    wait_until(lambda: stalled_in_the_table(worker), 60, what="the lead stalled")
    alerts = stall_alerts(broker, timeout=30)
    assert [a["deal_id"] for a in alerts] == ["stalled-deal"], "the alert was lost"
    assert total(worker.samples(), "funnel_failed_batches_total", agent="loop") >= 1


def test_a_kill_before_the_stall_alert_is_sent_raises_it_after_the_restart(broker, workers):
    doomed = workers("w1", FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1",
                     module="tests.faults", FAULT_CRASH_BEFORE_ALERTS="1")
    doomed.wait_ready()
    replay(broker, stalling_events())
    wait_until(lambda: doomed.process.poll() is not None, 60, what="the kill before the alert")
    assert doomed.process.returncode == 137
    survivor = workers("w2", FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1")
    survivor.wait_ready(90)
    alerts = stall_alerts(broker, timeout=60)
    assert [a["deal_id"] for a in alerts] == ["stalled-deal"], "the alert was lost"
    wait_until(lambda: stalled_in_the_table(survivor), 30, what="the stall remembered")


BIG_ACCOUNT_DEALS = 20_000


def won_deal(i, account="Megacorp"):
    """Deal ids as long as CRMs make them (a HubSpot/Salesforce id with its object prefix)."""
    return {"event_id": f"won-{i}", "deal_id": f"opportunity-0065g00000{i:08d}AAC-salesforce",
            "source": "api", "stage": "won",
            "occurred_at": "2024-03-01T00:00:00Z", "amount": 100 + i % 7, "account": account}


def test_an_account_with_20000_won_deals_keeps_its_lifetime_value_and_later_events_flow(broker, workers):
    """One row per account held every credited deal: at ~15,000 it outgrew a producer request
    and the account's credits partition stopped for good."""
    worker = workers()
    worker.wait_ready()
    replay(broker, [won_deal(i) for i in range(BIG_ACCOUNT_DEALS)])
    revenue = sum(100 + i % 7 for i in range(BIG_ACCOUNT_DEALS))

    def lifetime_value():
        samples = worker.samples()
        return samples and total(samples, "funnel_customer_lifetime_value_gsum")

    wait_until(lambda: lifetime_value() == revenue, 180, what=f"lifetime value {revenue}",
               show=lifetime_value)
    later = [won_deal(i) for i in range(BIG_ACCOUNT_DEALS, BIG_ACCOUNT_DEALS + 10)]
    later.append(won_deal(0, account="Smallco") | {"event_id": "moved-0",
                                                    "occurred_at": "2024-03-02T00:00:00Z"})
    replay(broker, later)
    expected = revenue + sum(100 + i % 7 for i in range(BIG_ACCOUNT_DEALS, BIG_ACCOUNT_DEALS + 10))
    wait_until(lambda: credits_settled(worker.samples()) and lifetime_value() == expected, 60,
               what="the later credits", show=lifetime_value)
    samples = worker.samples()
    assert total(samples, "funnel_customers") == 2
    assert total(samples, "funnel_won_revenue") == expected


def latest_deals(broker_url, app_id):
    """The deals table as its changelog holds it (latest value per key), stall episodes left
    out (they follow each worker's ticks), re-encoded for comparison."""
    latest = {}
    for message in read_all(broker_url, f"{app_id}-deals-changelog"):
        latest[message.key] = message.value
    deals = {}
    for key, value in latest.items():
        if value and not key.startswith(b"\x00"):  # not a position row, an end marker, a tombstone
            deal = decode_deal(value)
            deal.stall_alert = None
            deals[key] = encode_deal(deal)
    return deals


def exact(worker_list, timeout=120):
    """Wait until the workers' summed KPIs are the dataset's literal values; on a timeout, say
    what was last in the way."""
    last = ["nothing checked"]

    def check():
        found = []
        for worker in worker_list:
            samples = worker.samples()
            if samples is None or (total(samples, "funnel_active_partitions")
                                   and not total(samples, "funnel_worker_ready")):
                last[0] = f"{worker.name} not answering or not ready"
                return None
            found.append(samples)
        summed = merged(found)
        if not exported_once(summed):
            last[0] = "not every partition exported exactly once"
            return None
        try:
            assert_dataset_values(summed)
        except AssertionError as exc:
            last[0] = f"wrong KPIs: {exc}"
            return None
        return summed

    return wait_until(check, timeout, what="the dataset's literal values", show=lambda: last[0])


def test_a_batch_held_past_the_rebalance_timeout_writes_nothing_once_revoked(broker, workers):
    """The first worker's produce path stalls for 12 s (rebalance timeout 6 s) while a second
    worker joins: the group moves on without it, and its late batch must not land on top of the
    new owner's writes. Opening events first, closing events after, so the new owner changes
    the held batch's deals before the held batch would be written."""
    opening, closing = opening_and_closing()
    slow = holding_a_batch(broker, workers, opening, seconds=12)
    joining = workers("joining")
    replay(broker, closing)
    exact([slow, joining])
    time.sleep(15)  # past the held batch, whatever it did
    exact([slow, joining])
    assert_a_replay_from_scratch_agrees(workers, broker)


def opening_and_closing():
    """The dataset's opening events, and the events that close its deals."""
    deals = list(dataset_deals(DATASET))
    return [events[0] for events in deals], [event for events in deals for event in events[1:]]


def holding_a_batch(broker, workers, opening, seconds: float):
    """A worker whose first batch of table writes waits ``seconds`` before producing."""
    slow = workers("slow", module="tests.faults", FAULT_SLOW_FLUSHES="1",
                   FAULT_SLOW_FLUSH_SECONDS=str(seconds))
    slow.wait_ready()
    replay(broker, opening)
    wait_until(lambda: "fault: holding a batch" in slow.log_path.read_text(), 60,
               what="the held batch")
    return slow


def assert_a_replay_from_scratch_agrees(workers, broker):
    """KPIs and the deals changelog equal those of a replay from scratch under a new app id."""
    fresh = workers("fresh", FUNNEL_APP_ID="fresh")
    exact([fresh])
    assert latest_deals(broker.url, APP_ID) == latest_deals(broker.url, "fresh")


FROZEN_HOLD_SECONDS = 90


def test_a_worker_frozen_with_a_batch_in_flight_writes_nothing_once_the_group_moved_on(broker, workers):
    """Tansu waits for a slow but live member, so a held produce path alone never drops the
    first worker from the group. Frozen (SIGSTOP: no heartbeats) while it holds a batch, it is
    dropped after the session timeout; the second worker takes every partition and closes the
    held batch's deals. Woken (SIGCONT) before the hold ends, the first worker learns at its next
    heartbeat that it lost its membership, with the stale batch still in flight: that batch must
    write nothing (F13)."""
    opening, closing = opening_and_closing()
    slow = holding_a_batch(broker, workers, opening, seconds=FROZEN_HOLD_SECONDS)
    held_at = time.monotonic()
    slow.process.send_signal(signal.SIGSTOP)
    try:
        joining = workers("joining")
        replay(broker, closing)
        exact([joining], timeout=FROZEN_HOLD_SECONDS - 30)  # every partition, every deal closed
    finally:
        slow.process.send_signal(signal.SIGCONT)
    woken_at = time.monotonic()
    assert woken_at - held_at < FROZEN_HOLD_SECONDS - 10, "woken too late: the batch was no longer held"
    time.sleep(held_at + FROZEN_HOLD_SECONDS + 5 - woken_at)  # past the held batch, whatever it did
    exact([slow, joining])
    assert_a_replay_from_scratch_agrees(workers, broker)


def exported_by(samples) -> frozenset[str]:
    return frozenset(exported_partitions(samples))


class ScrapeRounds:
    """Scrapes every worker's /metrics in turn, a round about every 100 ms, in a thread of its
    own: which workers exported each partition in a round, and whether the summed KPIs of a
    round that exports every partition once are the dataset's literal values."""

    def __init__(self, worker_list) -> None:
        self.workers = worker_list  # the test appends the workers it starts
        self.rounds = self.complete = 0
        self.doubled: list[tuple[int, dict[str, list[str]]]] = []
        self.exports: dict[str, set[frozenset[str]]] = {}  # each worker's distinct exported sets
        self.wrong: list[tuple[int, str]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ScrapeRounds:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stopped.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stopped.wait(0.1):
            self._round()

    def _round(self) -> None:
        found, exporters = [], {}
        for worker in list(self.workers):
            samples = worker.samples() or {}
            exported = exported_by(samples)
            self.exports.setdefault(worker.name, set()).add(exported)
            for partition in exported:
                exporters.setdefault(partition, []).append(worker.name)
            found.append(samples)
        summed = merged(found)
        self.rounds += 1
        doubled = {partition: names for partition, names in exporters.items() if len(names) > 1}
        if doubled:
            self.doubled.append((self.rounds, doubled))
        if exported_once(summed):
            self.complete += 1
            try:
                assert_dataset_values(summed)
            except AssertionError as exc:
                self.wrong.append((self.rounds, str(exc)))


def test_a_recovery_overtaken_by_a_join_never_has_two_workers_export_one_partition(broker, workers):
    """w2's recovery completions are held until the next revoke (when Faust delivers a stale
    completion: its recovery's last round trips answered during a rebalance), at most 30 s; w3
    joins while the first one is held. With 8 partitions and standby replicas the sticky
    assignor moves one of w2's four partitions to w3: serving the stale completion exported it
    beside its new owner until w2's current completion (F12)."""
    env = {"FUNNEL_PARTITIONS": "8"}
    w1 = workers("w1", **env)
    w1.wait_ready()
    asyncio.run(produce(Settings(broker=broker.url, partitions=8), dataset_events(), progress=False))
    exact([w1])
    started = [w1]
    with ScrapeRounds(started) as rounds:
        w2 = workers("w2", module="tests.faults", FAULT_SLOW_RECOVERY_SECONDS="30", **env)
        started.append(w2)
        wait_until(lambda: "holding a recovery completion" in w2.log_path.read_text(), 90,
                   what="w2's recovery completion held")
        held_at = len(w2.log_path.read_text())
        w3 = workers("w3", **env)
        started.append(w3)
        wait_until(lambda: "completion released by a revoke" in w2.log_path.read_text()[held_at:], 90,
                   what="w2's completion overtaken by w3's join")
        # Not before: while the group rebalances, w1 and a stale w2 may still export all 8.
        wait_until(lambda: exported_by(w3.samples() or {}), 90, what="w3 exporting partitions")
        exact([w1, w2, w3], timeout=180)
    print(f"{rounds.rounds} scrape rounds, {rounds.complete} exporting every partition")
    assert rounds.complete, "no scrape round exported every partition"
    assert not rounds.doubled, (f"{len(rounds.doubled)} of {rounds.rounds} scrape rounds with a "
                                f"partition exported twice, first: {rounds.doubled[0]}")
    assert not rounds.wrong, (f"{len(rounds.wrong)} of {rounds.complete} complete scrape rounds "
                              f"with wrong KPIs, first: {rounds.wrong[0]}")
    (w1_beside_w2,) = {exported for exported in rounds.exports["w1"] if len(exported) == 4}
    moved = exported_by(w3.samples()) - w1_beside_w2
    assert moved, "none of w2's partitions moved to w3: a stale completion would have been harmless"


def test_the_stream_clock_is_one_for_the_fleet_and_ignores_an_event_dated_a_day_ahead(broker, workers):
    """With FUNNEL_CLOCK=stream each worker's clock was the latest event time it had seen: one
    event dated a day ahead moved its owner's clock (windows, periods, stalls) for good."""
    env = {"FUNNEL_CLOCK": "stream", "FUNNEL_TICK_INTERVAL": "1"}
    first, second = workers("w1", **env), workers("w2", **env)
    wait_until(lambda: all(w.samples() and total(w.samples(), "funnel_active_partitions") == 2
                           and total(w.samples(), "funnel_worker_ready") for w in (first, second)),
               90, what="two partitions each")
    normal = [{"event_id": f"n{i}", "deal_id": f"deal-{i}", "source": "api", "stage": "lead",
               "occurred_at": f"2024-01-{i + 1:02d}T00:00:00Z"} for i in range(20)]
    ahead = datetime.fromtimestamp(time.time() + 23 * 3600, UTC).isoformat().replace("+00:00", "Z")
    outlier = {"event_id": "ahead", "deal_id": "deal-ahead", "source": "api", "stage": "lead",
               "occurred_at": ahead}
    replay(broker, [*normal, outlier])
    latest = datetime(2024, 1, 20, tzinfo=UTC).timestamp()

    def clocks():
        found = []
        for worker in (first, second):
            samples = worker.samples()
            if samples is None:
                return None
            found.append((total(samples, "funnel_period_elapsed_ratio", period="year"),
                          total(samples, "funnel_clock_timestamp_seconds")))
        return found

    def agreed():
        found = clocks()
        events = sum(total(w.samples(), "funnel_events_total", outcome="accepted")
                     for w in (first, second))
        return found and events == 21 and found[0] == found[1] and found[0][1] == latest

    wait_until(agreed, 60, what="both clocks at the latest event not ahead", show=clocks)
    time.sleep(3)  # ticks and snapshots later: still there
    assert agreed(), clocks()
