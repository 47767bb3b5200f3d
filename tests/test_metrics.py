"""The exposition: promtool-clean, zeros from start-up, active partitions only, exact windows."""

import shutil
import subprocess
import zlib
from datetime import date, timedelta

import orjson
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from models.config import Clock, load_config
from models.kpis import parse_exposition, pipeline_kpis, total
from processors.clock import EventClock
from processors.deals import DealProcessor
from processors.folds import PartitionFolds
from processors.records import Record
from sinks.process_metrics import ProcessMetrics
from sinks.prometheus import KpiCollector, WorkerKpiCollector, current_partitions
from streams.tools.dataset import dataset_events

from .conftest import DATASET

CONFIG = load_config()


def build(active=None):
    registry = CollectorRegistry()
    clock = EventClock(Clock.STREAM)
    proc = DealProcessor(CONFIG, clock, max_skew_ms=86_400_000)
    ProcessMetrics(registry)
    registry.register(KpiCollector(CONFIG, lambda: list(proc.folds.folds.values()), clock.now_ms,
                                   "test"))
    return registry, proc


def promtool_check(text: bytes) -> subprocess.CompletedProcess:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is required (make test installs it)"
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)


def test_empty_worker_exports_every_known_series_as_zero_and_lints_clean():
    registry, _ = build()
    text = generate_latest(registry)
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = parse_exposition(text.decode())
    opens = {labels["stage"] for labels, value in samples["funnel_deals_open"]
             if value == 0 and labels["pipeline"] == "default"}
    assert opens == {"lead", "mql", "sql", "opportunity"}
    windows = {(s["outcome"], s["window"]) for s, _ in samples["funnel_deals_closed_window"]
               if s["pipeline"] == "default"}
    assert windows == {(o, w) for o in ("won", "lost") for w in ("7d", "30d", "90d")}
    assert ({"outcome": "won", "pipeline": "default", "le": "+Inf"}, 0.0) in samples[
        "funnel_time_to_close_seconds_bucket"]
    assert total(samples, "funnel_stall_after_seconds", pipeline="default", stage="lead") == 30 * 86400
    assert total(samples, "funnel_build_info", version="test") == 1


@pytest.fixture(scope="module")
def dataset_registry():
    registry, proc = build()
    table = {}
    events = [orjson.dumps(e) for e in dataset_events(DATASET)]
    for start in range(0, len(events), 1000):
        chunk = events[start:start + 1000]
        records = [Record(None, raw, "crm.events", 0, i) for i, raw in enumerate(chunk)]
        # deals stay on one partition: route by deal id like Kafka would
        for record in records:
            record.partition = hash(orjson.loads(record.value)["deal_id"]) % 2
        batch = proc.process(records, table.get)
        for deal_id, value, _ in batch.writes:
            table[deal_id] = value
    return registry, proc, table


def test_dataset_exposition_lints_clean_and_has_the_literal_values(dataset_registry):
    registry, _, _ = dataset_registry
    text = generate_latest(registry)
    assert promtool_check(text).returncode == 0
    kpis = pipeline_kpis(parse_exposition(text.decode()), "default", "USD")
    stages = {row.stage: row for row in kpis.stages}
    assert (stages["sql"].open, stages["opportunity"].open) == (500, 1589)
    assert (kpis.won, kpis.lost, kpis.won_revenue) == (4238, 2473, 10_005_534)
    assert kpis.avg_deal_size == pytest.approx(2360.909, abs=1e-3)
    assert kpis.avg_sales_cycle_s / 86400 == pytest.approx(51.782, abs=1e-3)
    assert kpis.leaderboard[0] == ("Darcel Schlecht", 1_153_214)


def test_windows_are_exact_against_a_batch_count(dataset_registry):
    """Stream clock at the last event (2017-12-31): closed in (now − W, now]."""
    registry, _, _ = dataset_registry
    import csv

    with open(DATASET / "sales_pipeline.csv") as f:
        rows = list(csv.DictReader(f))
    end = date(2017, 12, 31)
    samples = parse_exposition(generate_latest(registry).decode())
    for window, days in (("7d", 7), ("30d", 30), ("90d", 90)):
        start = end - timedelta(days=days)
        for outcome, stage in (("won", "Won"), ("lost", "Lost")):
            expected = sum(1 for r in rows if r["deal_stage"] == stage
                           and start < date.fromisoformat(r["close_date"]) <= end)
            got = total(samples, "funnel_deals_closed_window", outcome=outcome, window=window)
            assert got == expected, (window, outcome)
        revenue = sum(float(r["close_value"]) for r in rows if r["deal_stage"] == "Won"
                      and start < date.fromisoformat(r["close_date"]) <= end)
        assert total(samples, "funnel_won_revenue_window", window=window) == revenue


def test_only_active_partitions_are_exported(dataset_registry):
    registry, proc, table = dataset_registry
    everything = total(parse_exposition(generate_latest(registry).decode()), "funnel_deals_closed")
    proc.folds.rebuild({0}, (proc.contribution_of_stored(v) for v in table.values()))
    only_zero = total(parse_exposition(generate_latest(registry).decode()), "funnel_deals_closed")
    assert 0 < only_zero < everything
    proc.folds.rebuild({0, 1}, (proc.contribution_of_stored(v) for v in table.values()))
    assert total(parse_exposition(generate_latest(registry).decode()), "funnel_deals_closed") == everything


def test_stalls_periods_and_targets_on_the_dataset(dataset_registry):
    """Stream clock 2017-12-31, stall_after 30d: 1,571 stalled opportunities (one deal sits at
    exactly 30 days: not stalled); value at risk equals a batch computation from the CSV."""
    import csv

    registry, _, _ = dataset_registry
    samples = parse_exposition(generate_latest(registry).decode())
    with open(DATASET / "products.csv") as f:
        prices = {r["product"]: float(r["sales_price"]) for r in csv.DictReader(f)}
    with open(DATASET / "sales_pipeline.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["deal_stage"] == "Engaging"]
    end = date(2017, 12, 31)
    stalled = [r for r in rows if (end - date.fromisoformat(r["engage_date"])).days > 30]
    assert len(stalled) == 1571
    assert sum(1 for r in rows if (end - date.fromisoformat(r["engage_date"])).days == 30) == 1
    at_risk = sum(prices[r["product"].replace("GTXPro", "GTX Pro")] for r in stalled)
    assert total(samples, "funnel_deals_stalled", stage="opportunity") == 1571
    assert total(samples, "funnel_stalled_value", stage="opportunity") == at_risk
    assert total(samples, "funnel_deals_stalled", stage="sql") == 0  # entered at the clock
    with open(DATASET / "sales_pipeline.csv") as f:
        december = sum(float(r["close_value"]) for r in csv.DictReader(f)
                       if r["deal_stage"] == "Won" and r["close_date"] >= "2017-12-01")
    assert total(samples, "funnel_won_revenue_period", period="month") == december
    assert total(samples, "funnel_period_elapsed_ratio", period="month") == 30 / 31
    assert total(samples, "funnel_revenue_target", period="year", currency="USD") == 12_000_000


def test_target_attainment_and_forecast_equal_hand_computed_values(tmp_path):
    """Known targets, a clock in mid-month, won and open deals with expected close dates."""
    from models.config import DEFAULT_CONFIG
    from models.kpis import period_kpis

    text = DEFAULT_CONFIG.read_text().replace(
        "USD: {month: 1000000, quarter: 3000000, year: 12000000}",
        "USD: {month: 1000, quarter: 4000, year: 10000}")
    (tmp_path / "funnel.yaml").write_text(text)
    config = load_config(tmp_path / "funnel.yaml")
    registry = CollectorRegistry()
    clock = EventClock(Clock.STREAM)
    proc = DealProcessor(config, clock, max_skew_ms=86_400_000)
    registry.register(KpiCollector(config, lambda: list(proc.folds.folds.values()), clock.now_ms, "t"))

    def event(i, when, **change):
        return orjson.dumps({"event_id": f"e{i}", "deal_id": f"d{i}", "occurred_at": when, **change})

    raws = [
        event(1, "2024-05-10T00:00:00Z", stage="won", amount=300.0),          # won this month
        event(2, "2024-04-20T00:00:00Z", stage="won", amount=500.0),          # won last month (quarter)
        event(3, "2023-12-20T00:00:00Z", stage="won", amount=900.0),          # last year: no period
        event(4, "2024-05-02T00:00:00Z", stage="opportunity", amount=1000.0,  # p=0.4, closes in May
              expected_close_at="2024-05-25T00:00:00Z"),
        event(5, "2024-05-03T00:00:00Z", stage="sql", amount=200.0,           # p=0.2, closes in June
              expected_close_at="2024-06-10T00:00:00Z"),
        event(6, "2024-05-16T00:00:00Z", stage="lead"),                       # moves the clock
    ]
    table = {}
    batch = proc.process([Record(None, raw, "crm.events", 0, i) for i, raw in enumerate(raws)],
                         table.get)
    assert not batch.rejections
    samples = parse_exposition(generate_latest(registry).decode())
    month = period_kpis(samples, "default", "USD", "month")
    assert month.won == 300 and month.target == 1000
    assert month.attainment == 0.3
    assert month.expected_to_date == pytest.approx(1000 * 15 / 31)          # 15 of 31 days gone
    assert month.forecast == pytest.approx(300 + 1000 * 0.4)
    quarter = period_kpis(samples, "default", "USD", "quarter")
    assert quarter.won == 800 and quarter.attainment == 0.2
    assert quarter.forecast == pytest.approx(800 + 1000 * 0.4 + 200 * 0.2)
    assert quarter.expected_to_date == pytest.approx(4000 * (30 + 15) / 91)  # Apr 1 → May 16
    year = period_kpis(samples, "default", "USD", "year")
    assert year.won == 800 and year.attainment == 0.08


def test_a_batch_of_lags_exports_what_one_observe_per_event_would():
    values = [-5, 0, 49, 50, 51, 100, 2_500, 86_400_000, 10**12, 7]
    per_event, batched = CollectorRegistry(), CollectorRegistry()
    histogram = ProcessMetrics(per_event).lag.labels("csv")
    for value in values:
        histogram.observe(max(value, 0) / 1000)
    ProcessMetrics(batched).counted({}, {"csv": values})
    assert generate_latest(batched) == generate_latest(per_event)


def test_window_and_period_sums_kept_between_scrapes_equal_a_rebuild_from_the_table():
    """Scrapes read window and period sums that Fold.apply keeps up to date; after more events
    (late ones among them, in old and in current hours) they must equal sums read afresh from
    every hour bucket of folds rebuilt from the table."""
    _, proc = build()
    proc.folds.rebuild(set(range(4)), ())

    def kpis(processor):
        registry = CollectorRegistry()
        registry.register(KpiCollector(CONFIG, lambda: list(processor.folds.folds.values()),
                                       processor.clock.now_ms, "test"))
        return registry

    registry = kpis(proc)
    table = {}
    events = [orjson.dumps(e) for e in dataset_events(DATASET)]

    def run(chunk, first_offset):
        records = [Record(None, value, "crm.events",
                          zlib.crc32(orjson.loads(value)["deal_id"].encode()) % 4, first_offset + i)
                   for i, value in enumerate(chunk)]
        batch = proc.process(records, table.get)
        for deal_id, value, _ in batch.writes:
            table[deal_id] = value

    half = len(events) // 2
    run(events[:half], 0)
    generate_latest(registry)  # the sums are kept from here on
    for start in range(half, len(events), 2000):
        run(events[start:start + 2000], start)
        kept = generate_latest(registry)
    _, rebuilt = build()
    rebuilt.folds.rebuild(set(range(4)), (rebuilt.contribution_of_stored(v) for v in table.values()))
    assert rebuilt.clock.now_ms() == proc.clock.now_ms()
    assert generate_latest(kpis(rebuilt)) == kept
    samples = parse_exposition(kept.decode())
    assert total(samples, "funnel_deals_closed_window", window="90d") > 0
    assert total(samples, "funnel_won_revenue_period", period="year") > 0


def test_a_worker_exports_kpis_only_of_partitions_whose_folds_are_all_rebuilt():
    """Issue 18: no KPI gauge at all (not even zeros) before a partition's deal and customer
    folds are rebuilt, and funnel_partition_exported lists exactly the partitions whose gauges
    the same scrape carries, so the recording rules can tell a complete fleet from a partial one."""
    registry = CollectorRegistry()
    clock = EventClock(Clock.STREAM)
    proc = DealProcessor(CONFIG, clock, max_skew_ms=86_400_000)
    customers = PartitionFolds()
    registry.register(WorkerKpiCollector(
        CONFIG, lambda: current_partitions(proc.folds.folds, customers.folds), clock.now_ms, "t", 4))
    created = orjson.dumps({"event_id": "e1", "deal_id": "d1", "occurred_at": "2024-05-01T10:00:00Z",
                            "stage": "sql", "amount": 10.0})

    def scrape():
        text = generate_latest(registry)
        assert promtool_check(text).returncode == 0
        samples = parse_exposition(text.decode())
        exported = {labels["partition"] for labels, value in samples.get("funnel_partition_exported", [])
                    if value == 1}
        return samples, exported

    proc.folds.revoke_all()
    customers.revoke_all()  # a rebalance: nothing owned until rebuilt
    samples, exported = scrape()
    assert exported == set() and "funnel_deals_open" not in samples
    assert total(samples, "funnel_partitions") == 4  # config gauges stay
    proc.folds.rebuild({0, 1}, ())
    samples, exported = scrape()  # deals rebuilt, customers not yet
    assert exported == set() and "funnel_deals_open" not in samples
    customers.rebuild({0, 1}, ())
    batch = proc.process([Record(b"d1", created, "crm.events", 1, 0)], lambda key: None)
    assert batch.writes
    samples, exported = scrape()
    assert exported == {"0", "1"}
    assert total(samples, "funnel_deals_open", stage="sql") == 1
    assert total(samples, "funnel_deals_open", stage="lead") == 0  # every known series, zeros too
    proc.folds.revoke_all()
    samples, exported = scrape()
    assert exported == set() and "funnel_deals_open" not in samples


def test_owner_names_are_info_series_and_the_rep_series_keep_the_id():
    """funnel_owner_info carries each configured name (quotes, backslashes and unicode escaped
    and promtool-clean); funnel_rep_won_revenue stays keyed by the id events carry."""
    names = {"hubspot:owner:1": 'Jane "JD" O\'Neil \\ Zoë: EMEA', "hubspot:owner:2": "Li Wei"}
    config = CONFIG.model_copy(update={"owners": names})
    registry = CollectorRegistry()
    clock = EventClock(Clock.STREAM)
    proc = DealProcessor(config, clock, max_skew_ms=86_400_000)
    registry.register(KpiCollector(config, lambda: list(proc.folds.folds.values()), clock.now_ms, "t"))
    won = orjson.dumps({"event_id": "e1", "deal_id": "d1", "occurred_at": "2024-05-01T10:00:00Z",
                        "stage": "won", "amount": 10.0, "owner": "hubspot:owner:1"})
    proc.folds.rebuild({0}, ())
    assert proc.process([Record(b"d1", won, "crm.events", 0, 0)], lambda key: None).writes
    text = generate_latest(registry)
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr
    samples = parse_exposition(text.decode())
    info = sorted((labels["owner"], labels["name"], value) for labels, value in samples["funnel_owner_info"])
    assert info == [("hubspot:owner:1", names["hubspot:owner:1"], 1), ("hubspot:owner:2", "Li Wei", 1)]
    assert [labels["owner"] for labels, _ in samples["funnel_rep_won_revenue"]] == ["hubspot:owner:1"]
