"""Conversion drops: the rule on sums, and one alert per drop episode across all partitions."""

import orjson

from models.config import ConversionDrop, load_config
from models.kpis import conversion_checks
from processors.records import Record
from streams.worker.publisher import KpiPublisher

RULE = ConversionDrop()
ORDER = {"default": ["lead", "mql", "sql", "opportunity"]}


def reached(mql7, sql7, mql90, sql90):
    return {("default", "mql"): {"7d": mql7, "90d": mql90},
            ("default", "sql"): {"7d": sql7, "90d": sql90}}


def drop_of(counts):
    checks = {c.stage: c for c in conversion_checks(counts, ORDER, RULE)}
    return checks["mql"]


def test_drop_below_70_percent_of_baseline_with_volume():
    check = drop_of(reached(mql7=40, sql7=8, mql90=440, sql90=208))  # 20% vs 50%
    assert check.dropped
    assert check.conversion == 0.2 and check.baseline == 0.5


def test_normal_variation_is_not_a_drop():
    assert not drop_of(reached(mql7=40, sql7=15, mql90=440, sql90=215)).dropped  # 37.5% vs 50%


def test_low_volume_is_not_a_drop():
    assert not drop_of(reached(mql7=10, sql7=0, mql90=410, sql90=200)).dropped
    assert not drop_of(reached(mql7=40, sql7=0, mql90=80, sql90=20)).dropped  # thin baseline


def partials(partition, as_of, counts):
    """The deals and customers partials of one partition (only reached windows matter here)."""
    rows = [["funnel_deals_reached_window", {"pipeline": pl, "stage": stage, "window": w}, n]
            for (pl, stage), windows in counts.items() for w, n in windows.items()]
    return [Record(None, orjson.dumps(["deals", partition, as_of, rows, [], 0]), "partials", 0, as_of),
            Record(None, orjson.dumps(["customers", partition, as_of, [], [], 0]), "partials", 0,
                   as_of)]


class Table(dict):
    def load(self, key, record):
        return self.get(key)


def run(publisher, table, records, group_generation=0):
    out = publisher.process(records, table.load, group_generation)
    for key, value in out.claim + out.writes:
        table[key] = value
    return [(a.type, a.stage) for a in out.alerts], out


def test_one_alert_per_episode_summed_over_partitions_and_across_restarts():
    config, table = load_config(), Table()
    publisher = KpiPublisher(config, partitions=2, version="t")
    # Each partition alone has too little volume to judge: the sum over partitions decides.
    half_drop = reached(mql7=10, sql7=2, mql90=110, sql90=52)
    assert run(publisher, table, partials(0, 1, half_drop))[0] == []   # partition 1 missing
    types, out = run(publisher, table, partials(1, 1, half_drop))
    assert types == [("conversion.drop", "mql")]
    alert = out.alerts[0]
    assert alert.next_stage == "sql" and alert.conversion == 0.2
    assert run(publisher, table, partials(0, 2, half_drop) + partials(1, 2, half_drop))[0] == []
    restarted = KpiPublisher(config, partitions=2, version="t")        # state is in the table
    assert run(restarted, table, partials(0, 3, half_drop) + partials(1, 3, half_drop))[0] == []
    healthy = reached(mql7=10, sql7=5, mql90=110, sql90=55)
    types, recovered = run(restarted, table, partials(0, 4, healthy) + partials(1, 4, healthy))
    assert types == [("conversion.recovered", "mql")]
    assert recovered.alerts[0].id != alert.id


def test_an_older_partial_never_replaces_a_newer_one():
    publisher, table = KpiPublisher(load_config(), partitions=1, version="t"), Table()
    drop = reached(mql7=40, sql7=8, mql90=440, sql90=208)
    healthy = reached(mql7=40, sql7=20, mql90=440, sql90=220)
    assert run(publisher, table, partials(0, 5, drop))[0] == [("conversion.drop", "mql")]
    assert run(publisher, table, partials(0, 4, healthy))[0] == []


def test_generation_increases_with_every_new_owner_and_sequence_within_it():
    table = Table()
    first = KpiPublisher(load_config(), partitions=1, version="t")
    _, out = run(first, table, partials(0, 1, {}))
    pairs = [(s.generation, s.sequence) for s in out.snapshots]
    generation = pairs[0][0]  # a fleet's first claim: the wall clock in ms
    assert all(p == (generation, i + 1) for i, p in enumerate(pairs))
    second = KpiPublisher(load_config(), partitions=1, version="t")
    _, out = run(second, table, partials(0, 2, {}))
    assert {s.generation for s in out.snapshots} == {generation + 1}


def test_conversion_is_not_judged_while_a_partition_catches_up():
    publisher, table = KpiPublisher(load_config(), partitions=1, version="t"), Table()
    drop = reached(mql7=40, sql7=8, mql90=440, sql90=208)
    records = partials(0, 5, drop)
    lagging = orjson.loads(records[0].value)
    lagging[-1] = 50_000
    records[0] = Record(None, orjson.dumps(lagging), "partials", 0, 5)
    types, out = run(publisher, table, records)
    assert types == [] and out.snapshots  # snapshots still go out
    assert run(publisher, table, partials(0, 6, drop))[0] == [("conversion.drop", "mql")]


def customer_partials(as_of, generation, lifetime_value):
    """Partition 0's partials as sent in a consumer-group generation, one customer's value."""
    deals = orjson.dumps(["deals", 0, as_of, [], [], 0, generation])
    top = [["default", "USD", "Acme", lifetime_value * 1_000_000]]
    customers = orjson.dumps(["customers", 0, as_of, [], top, 0, generation])
    return [Record(None, deals, "partials", 0, 0), Record(None, customers, "partials", 0, 0)]


def lifetime_values(out):
    return [s.customers.top[0].lifetime_value for s in out.snapshots if s.pipeline == "default"]


def test_a_new_owner_never_publishes_partials_sent_before_it_took_over():
    # The backlog a new owner re-reads holds partials of owners since gone, some mid-replay.
    table = Table()
    run(KpiPublisher(load_config(), partitions=1, version="t"), table,
        customer_partials(as_of=1, generation=4, lifetime_value=100), group_generation=4)
    first_generation = int(table["generation"])
    second = KpiPublisher(load_config(), partitions=1, version="t")
    _, out = run(second, table, customer_partials(as_of=2, generation=4, lifetime_value=40),
                 group_generation=5)
    assert out.snapshots == []
    _, out = run(second, table, customer_partials(as_of=3, generation=5, lifetime_value=100),
                 group_generation=5)
    assert [s.generation for s in out.snapshots if s.pipeline == "default"] == [first_generation + 1]
    assert lifetime_values(out) == [100]


def test_a_newer_generations_partial_wins_whatever_the_clocks_say():
    # With the stream clock each worker's time is the latest event it saw: the old owner's
    # last partial can carry a later time than the new owner's first ones.
    publisher, table = KpiPublisher(load_config(), partitions=1, version="t"), Table()
    run(publisher, table, customer_partials(as_of=900, generation=2, lifetime_value=40),
        group_generation=2)
    _, out = run(publisher, table, customer_partials(as_of=700, generation=3, lifetime_value=100),
                 group_generation=3)
    assert lifetime_values(out) == [100]
    _, out = run(publisher, table, customer_partials(as_of=950, generation=2, lifetime_value=40),
                 group_generation=3)
    assert out.snapshots == []  # a late partial of the old owner changes nothing
