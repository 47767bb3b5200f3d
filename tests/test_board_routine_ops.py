"""The board during routine operations shows the truth or nothing (issue 18, item 7).

Two workers hold the dataset replay (8 partitions, standby replicas 1). A real Prometheus
loads the repo's rules with a 1 s scrape and evaluation interval and discovers the workers from
a file, as an orchestrator's discovery would: a worker is listed from its start until it has
exited. Then, as an operator would: a third worker is added, one is stopped with SIGTERM, one is
killed with SIGKILL and a replacement started. Every raw sample the recording rules wrote over
the whole scenario must equal the truth (the values recorded after the replay, which equal the
dataset's own counts): a gap is honest, a dip is a lie. No alert may fire, and no KPI alert may
start pending. The test prints the gaps per operation.
"""

from __future__ import annotations

import asyncio
import time
from itertools import pairwise

import pytest

from streams.kafka.settings import Settings
from streams.tools.dataset import dataset_deals
from streams.tools.producer import produce

from .conftest import DATASET, wait_until
from .test_ops_live import lp
from .test_reliability_scale import Truth

pytestmark = pytest.mark.broker

PARTITIONS = 8
SESSION_TIMEOUT = 6
ENV = {"FUNNEL_PARTITIONS": str(PARTITIONS), "FUNNEL_STANDBY_REPLICAS": "1",
       "FUNNEL_SESSION_TIMEOUT": str(SESSION_TIMEOUT), "FUNNEL_REBALANCE_TIMEOUT": "6",
       "FUNNEL_STORE": "rocksdb://"}
# The recorded KPI series an operator reads off the boards.
KPI_RULES = (
    "pipeline_stage:funnel_deals_open:sum",
    "pipeline:funnel_deals_open:sum",
    "pipeline_stage_currency:funnel_open_value:sum",
    "pipeline_currency:funnel_won_revenue:sum",
    "pipeline_outcome:funnel_deals_closed:sum",
    "pipeline:funnel_win_rate:ratio",
    "pipeline_stage:funnel_stage_conversion:ratio",
    "pipeline:funnel_customers:sum",
)
KPI_ALERTS = ("FunnelStalledDealsHigh", "FunnelStageConversionDrop", "FunnelWinRateDrop")


def series_key(metric: dict) -> tuple:
    return tuple(sorted(metric.items()))


def recorded_now(prom) -> dict[tuple, float]:
    names = "|".join(KPI_RULES)
    return {series_key(r["metric"]): float(r["value"][1])
            for r in prom.query(f'{{__name__=~"{names}"}}')}


def raw_samples(prom, selector: str, start: float, end: float) -> dict[tuple, list[tuple[float, float]]]:
    """Every sample written between start and end (not resampled): (timestamp, value)."""
    return {series_key(r["metric"]): r["values"] for r in prom.raw_samples(selector, start, end)}


def close(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def settled(prom, reference: dict[tuple, float], workers: list) -> bool:
    """Every KPI series recorded with its true value and each live worker owns partitions."""
    now = recorded_now(prom)
    if set(now) != set(reference) or not all(close(now[k], v) for k, v in reference.items()):
        return False
    owners = {r["metric"]["instance"]: float(r["value"][1])
              for r in prom.query("funnel_active_partitions")}
    return all(owners.get(f"127.0.0.1:{w.port}", 0) > 0 for w in workers)


def wait_settled(prom, reference, workers, what: str, timeout: float = 90,
                 not_before: float = 0.0) -> float:
    """Until the truth has been recorded for 3 s in a row (settled, not passing through),
    counted from ``not_before`` (monotonic) at the earliest."""
    since: list[float] = []

    def steady() -> bool:
        if time.monotonic() < not_before or not settled(prom, reference, workers):
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= 3

    wait_until(steady, timeout, interval=0.5, what=what,
               show=lambda: {"recorded": len(recorded_now(prom)), "of": len(reference)})
    return time.time()


def gaps(series: dict[tuple, list[tuple[float, float]]], start: float, end: float,
         step: float = 1.0) -> list[tuple[float, float]]:
    """(first evaluation without, length) of every stretch without any KPI sample."""
    stamps = sorted({t for samples in series.values() for t, _ in samples})
    edges = [start, *stamps, end]
    return [(a + step, b - a - step) for a, b in pairwise(edges)
            if b - a > 1.5 * step]


def test_adding_stopping_and_killing_workers_never_records_a_wrong_kpi(broker, workers, tmp_path):
    deals = list(dataset_deals(DATASET))
    truth = Truth.of(deals)
    w1, w2 = workers("w1", **ENV), workers("w2", **ENV)
    targets = tmp_path / "targets.json"
    listed = [w1, w2]

    def discover() -> None:
        prom.write_targets([f"127.0.0.1:{w.port}" for w in listed])

    prom = lp.LivePrometheus("http://unused/metrics", tmp_path / "prometheus", targets_file=targets)
    discover()
    with prom:
        w1.wait_ready()
        w2.wait_ready()
        asyncio.run(produce(Settings(broker=broker.url, partitions=PARTITIONS),
                            [e for events in deals for e in events], progress=False))

        # The truth: the recorded values once the replay is settled, checked against the
        # dataset's own counts.
        def replay_recorded():
            now = recorded_now(prom)
            won = now.get(series_key({"__name__": "pipeline_outcome:funnel_deals_closed:sum",
                                      "outcome": "won", "pipeline": "default"}))
            customers = now.get(series_key({"__name__": "pipeline:funnel_customers:sum",
                                            "pipeline": "default"}))
            return won == truth.won and customers == 85 and now

        wait_until(replay_recorded, 120, interval=0.5, what="the replay recorded")
        time.sleep(3)
        reference = recorded_now(prom)
        sel = (("pipeline", "default"),)
        assert reference[(("__name__", "pipeline:funnel_deals_open:sum"), *sel)] == sum(truth.open.values())
        assert reference[(("__name__", "pipeline_currency:funnel_won_revenue:sum"),
                          ("currency", "USD"), *sel)] == pytest.approx(truth.won_revenue, abs=0.01)
        assert reference[(("__name__", "pipeline:funnel_win_rate:ratio"), *sel)] == (
            pytest.approx(truth.won / truth.closed(), rel=1e-12))
        assert reference[(("__name__", "pipeline_stage:funnel_stage_conversion:ratio"),
                          ("next_stage", "opportunity"), *sel, ("stage", "sql"))] == (
            pytest.approx((truth.open["opportunity"] + truth.closed()) / len(deals), rel=1e-12))
        start = wait_settled(prom, reference, [w1, w2], "two workers")
        # Alerts already pending on the truth (every open deal of 2017 is stalled by the wall clock)
        pending_before = {a["labels"]["alertname"] for a in prom.alerts()}

        operations: list[tuple[str, float]] = []
        operations.append(("join of a third worker", time.time()))
        w3 = workers("w3", **ENV)
        listed.append(w3)
        discover()
        wait_settled(prom, reference, [w1, w2, w3], "three workers")

        operations.append(("SIGTERM of a worker", time.time()))
        w1.stop()
        listed.remove(w1)
        discover()
        wait_settled(prom, reference, [w2, w3], "after the SIGTERM")

        operations.append(("SIGKILL of a worker and its replacement", time.time()))
        w2.kill()
        killed = time.monotonic()
        w4 = workers("w4", **ENV)
        listed.append(w4)
        discover()
        time.sleep(2)  # the dead worker stays discovered until the orchestrator notices
        listed.remove(w2)
        discover()
        # The group drops the dead member when its session times out (6 s), a second rebalance.
        end = wait_settled(prom, reference, [w3, w4], "after the kill and the replacement",
                           not_before=killed + 2.5 * SESSION_TIMEOUT)

        names = "|".join(KPI_RULES)
        recorded = raw_samples(prom, f'{{__name__=~"{names}"}}', start, end)
        firing = raw_samples(prom, 'ALERTS{alertstate="firing"}', start, end)
        pending = raw_samples(prom, 'ALERTS{alertstate="pending"}', start, end)

    wrong = []
    for key, samples in recorded.items():
        expected = reference.get(key)
        for stamp, value in samples:
            if expected is None or not close(value, expected):
                wrong.append((stamp, dict(key)["__name__"], dict(key), value, expected))
    wrong.sort(key=lambda w: w[0])
    print(f"\n{sum(len(s) for s in recorded.values())} KPI samples over {end - start:.0f}s, "
          f"{len(wrong)} wrong")
    bounds = [at for _, at in operations] + [end]
    for (what, at), until in zip(operations, bounds[1:], strict=True):
        found = [(b, length) for b, length in gaps(recorded, start, end) if at <= b < until]
        bad = sorted({name for stamp, name, *_ in wrong if at <= stamp < until})
        print(f"{what}: gaps {[f'{length:.0f} s from +{b - at:.0f} s' for b, length in found]}, "
              f"total {sum(length for _, length in found):.0f}s; "
              f"wrong samples {sum(1 for w in wrong if at <= w[0] < until)} ({', '.join(bad)})")
    new_pending = {dict(k)["alertname"] for k in pending} & set(KPI_ALERTS) - pending_before
    print(f"alerts pending on the truth before the operations: {sorted(pending_before)}; "
          f"pending during them: {sorted({dict(k)['alertname'] for k in pending})}")
    assert not wrong, f"{len(wrong)} wrong KPI samples, first: " + "; ".join(
        f"{name}{ {k: v for k, v in labels.items() if k != '__name__'} } = {value} "
        f"(truth {expected}) at +{stamp - start:.0f}s" for stamp, name, labels, value, expected in wrong[:5])
    assert not firing, f"alerts fired: {sorted({dict(k)['alertname'] for k in firing})}"
    assert not new_pending, f"KPI alerts started pending: {sorted(new_pending)}"
