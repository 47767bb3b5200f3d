"""Scale-out: several workers on one topic set through rebalances (issue 7, item 2).

Six partitions, standby replicas 1. Workers come and go while the dataset is replayed in
parts: two workers → a third added → one stopped gracefully (SIGTERM) → a fourth added → one
killed (SIGKILL). After each step, once settled, the sum of ``/metrics`` over the live workers
must equal the truth for the events sent so far (the literal dataset values at the end), every
partition must be owned by exactly one live worker, and standby copies must never be exported.
A sampler scrapes all live workers every 0.2 s throughout, and no sum may ever exceed the
truth of what had been sent (no double counting, not even during a rebalance).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from models.kpis import Samples, pipeline_kpis, total
from streams.kafka.settings import Settings
from streams.tools.dataset import dataset_deals
from streams.tools.producer import produce
from streams.worker.faust_app import faust_app

from .conftest import DATASET, credits_settled, merged, wait_until
from .test_e2e_pipeline import assert_dataset_values

pytestmark = pytest.mark.broker

PARTITIONS = 6
ENV = {"FUNNEL_PARTITIONS": str(PARTITIONS), "FUNNEL_STANDBY_REPLICAS": "1",
       "FUNNEL_CLOCK": "stream"}
DATASET_STAGES = {"Prospecting": "sql", "Engaging": "opportunity", "Won": "won", "Lost": "lost"}


@dataclass
class Truth:
    """KPIs of a set of dataset deals, computed from the events alone (no project code)."""

    open: Counter = field(default_factory=Counter)
    open_value: Counter = field(default_factory=Counter)
    won: int = 0
    lost: int = 0
    won_revenue: float = 0.0

    @classmethod
    def of(cls, deals: list[list[dict]]) -> Truth:
        truth = cls()
        for events in deals:
            stage = DATASET_STAGES[events[-1]["stage"]]
            if stage == "won":
                truth.won += 1
                truth.won_revenue += events[-1]["amount"]
            elif stage == "lost":
                truth.lost += 1
            else:
                truth.open[stage] += 1
                truth.open_value[stage] += events[0]["amount"]
        return truth

    def closed(self) -> int:
        return self.won + self.lost


def observed(samples: Samples) -> Truth:
    kpis = pipeline_kpis(samples, "default", "USD")
    seen = Truth(won=round(kpis.won), lost=round(kpis.lost), won_revenue=kpis.won_revenue)
    for row in kpis.stages:
        if row.open:
            seen.open[row.stage] = round(row.open)
            seen.open_value[row.stage] = row.open_value
    return seen


def same(seen: Truth, truth: Truth) -> bool:
    return (seen.won, seen.lost, dict(seen.open)) == (truth.won, truth.lost, dict(truth.open)) \
        and abs(seen.won_revenue - truth.won_revenue) < 0.01 \
        and all(abs(seen.open_value[s] - truth.open_value[s]) < 0.01 for s in truth.open_value)


class Sampler(threading.Thread):
    """Scrapes every live worker all the time; remembers the largest sums ever seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.live: list = []
        self.sent = Truth()  # truth of everything sent so far (set before sending)
        self.overshoots: list[str] = []
        self.scrapes = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            found = [s for s in (w.samples() for w in list(self.live)) if s]
            if found:
                self.scrapes += 1
                seen, limit = observed(merged(found)), self.sent
                if seen.won > limit.won or seen.lost > limit.lost or \
                        seen.won_revenue > limit.won_revenue + 0.01:
                    self.overshoots.append(f"won {seen.won}/{limit.won} lost {seen.lost}/"
                                          f"{limit.lost} revenue {seen.won_revenue}")
            time.sleep(0.2)


def send(broker_url: str, deals: list[list[dict]], rate: float = 0.0) -> None:
    events = [event for events in deals for event in events]
    asyncio.run(produce(Settings(broker=broker_url, partitions=PARTITIONS), events, rate=rate,
                        progress=False))


def lag_partitions(samples: Samples) -> set[str]:
    return {labels["partition"] for labels, _ in samples.get("funnel_consumer_lag_messages", ())
            if labels.get("topic") == "crm.events"}


def settled_on(live: list, truth: Truth, timeout: float = 75) -> list[Samples]:
    """Wait until the live workers serve all partitions between them and sum to the truth."""
    last: dict[str, object] = {}

    def check():
        per_worker = []
        for worker in live:
            if worker.process.poll() is not None:
                raise RuntimeError(f"{worker.name} died:\n{worker.log_tail()}")
            samples = worker.samples()
            if not samples or total(samples, "funnel_worker_ready") != 1:
                last["state"] = f"{worker.name} not ready"
                return None
            per_worker.append(samples)
        active = [total(s, "funnel_active_partitions") for s in per_worker]
        both = merged(per_worker)
        seen = observed(both)
        last["state"] = (f"active {active}; seen won {seen.won} lost {seen.lost} open "
                         f"{dict(seen.open)}; truth won {truth.won} lost {truth.lost} open "
                         f"{dict(truth.open)}; credits settled {credits_settled(both)}")
        if sum(active) != PARTITIONS or 0 in active:
            return None
        if not credits_settled(both) or not same(seen, truth):
            return None
        return per_worker

    try:
        wait_until(check, timeout, what=f"{len(live)} workers summing to the truth")
        time.sleep(1.5)  # stable, not a passing coincidence
        return wait_until(check, 10, what="the same sums a moment later")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {last.get('state')}") from None


def check_step(live: list, truth: Truth, what: str, started: float, stale: list[str]) -> None:
    per_worker = settled_on(live, truth)
    active = [int(total(s, "funnel_active_partitions")) for s in per_worker]
    standby = [int(total(s, "funnel_standby_partitions")) for s in per_worker]
    # Standby copies exist on every worker but only active partitions are exported: the sums
    # above equal the truth, where exported standbys would count partitions twice.
    assert all(count > 0 for count in standby), standby
    assert sum(standby) == PARTITIONS, standby
    # No stale series: each partition's lag is exported by exactly one live worker (checked at
    # the end, so that one run reports every step).
    owners = Counter(p for s in per_worker for p in lag_partitions(s))
    if any(count > 1 for count in owners.values()):
        stale.append(f"{what}: funnel_consumer_lag_messages partitions exported per worker "
                     f"{[sorted(lag_partitions(s)) for s in per_worker]}")
    print(f"{what}: settled {time.monotonic() - started:.1f}s after the change; "
          f"active {active}, standby {standby}; won {truth.won}, lost {truth.lost}, "
          f"open {dict(truth.open)}")


def test_workers_added_stopped_and_killed_keep_the_sums_exact(broker, workers):
    deals = list(dataset_deals(DATASET))
    full = Truth.of(deals)
    assert (full.won, full.lost, full.open["sql"], full.open["opportunity"]) == (4238, 2473, 500, 1589)
    parts = [deals[i * len(deals) // 5:(i + 1) * len(deals) // 5] for i in range(5)]
    sent: list[list[dict]] = []
    stale: list[str] = []
    sampler = Sampler()

    def feed(part: list[list[dict]], rate: float = 0.0) -> threading.Thread:
        sent.extend(part)
        sampler.sent = Truth.of(sent)
        thread = threading.Thread(target=send, args=(broker.url, part, rate))
        thread.start()
        return thread

    w1, w2 = workers("w1", **ENV), workers("w2", **ENV)
    live = [w1, w2]
    sampler.live = live
    sampler.start()
    try:
        started = time.monotonic()
        feed(parts[0]).join()
        check_step(live, Truth.of(sent), "two workers", started, stale)

        started = time.monotonic()  # add a worker while events flow
        w3 = workers("w3", **ENV)
        live.append(w3)
        feed(parts[1], rate=800).join()
        check_step(live, Truth.of(sent), "third worker added", started, stale)

        started = time.monotonic()  # stop one gracefully while events flow
        traffic = feed(parts[2], rate=800)
        w1.stop()
        assert w1.process.returncode == 0, w1.log_tail()
        live.remove(w1)
        traffic.join()
        check_step(live, Truth.of(sent), "w1 stopped (SIGTERM)", started, stale)

        started = time.monotonic()  # back to three
        live.append(workers("w4", **ENV))
        feed(parts[3], rate=800).join()
        check_step(live, Truth.of(sent), "fourth worker added", started, stale)

        started = time.monotonic()  # kill one while events flow
        traffic = feed(parts[4], rate=800)
        time.sleep(1)
        w2.kill()
        live.remove(w2)
        traffic.join()
        check_step(live, Truth.of(sent), "w2 killed (SIGKILL)", started, stale)
        assert_dataset_values(merged([w.samples() for w in live]))
    finally:
        sampler.halt.set()
        sampler.join(5)
    print(f"sampler: {sampler.scrapes} scrapes of all live workers, "
          f"{len(sampler.overshoots)} above the truth")
    assert not sampler.overshoots, sampler.overshoots[:5]
    assert not stale, stale


def test_changelog_records_queued_for_a_standby_survive_faust_resuming_a_running_flow():
    """Faust reads every changelog record (table recovery and standby copies) through one
    queue, and its flow control clears that queue on ``resume()``. After a rebalance, Faust
    suspends the flow and resumes it for recovery; then it resumes the running flow again,
    once standby partitions start reading and again when recovery ends ("Worker ready").
    mode's FlowControlEvent cleared the queue at those later resumes too. The standby records
    already fetched were dropped, and the consumer had moved past them: a hole below the
    standby copy's persisted offset. When the worker later took the partition over, recovery
    started after the hole, so a customers row stayed missing and lifetime value stayed
    short. tests/test_board_routine_ops.py saw it after a SIGTERM handed a partition to the
    worker holding its standby copy. Records queued before a suspension are stale (recovery
    seeks again) and are still cleared. No broker needed: the worker's own Faust app."""
    app = faust_app(Settings(partitions=PARTITIONS))
    changelog = app.tables.changelog_queue  # Faust's queue for table recovery and standbys
    app.flow_control.resume()  # recovery of an assignment: the flow runs
    changelog.put_nowait("a standby record, fetched and not applied yet")
    app.flow_control.resume()  # Faust resumes the running flow (standbys started, recovery ended)
    assert changelog.qsize() == 1, "a queued changelog record was dropped"
    app.flow_control.suspend()  # a rebalance: what is queued is stale
    app.flow_control.resume()
    assert changelog.qsize() == 0
