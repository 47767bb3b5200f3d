"""Conversion drops: the rule on sums, and one alert per drop episode across all partitions."""

import orjson

from models.config import ConversionDrop, load_config
from models.kpis import conversion_checks
from streams.processor import ConversionWatch, Record

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


def partial(partition, as_of, counts):
    rows = [[pl, stage, windows] for (pl, stage), windows in counts.items()]
    return Record(None, orjson.dumps([partition, as_of, rows]), "partials", 0, as_of)


class Table(dict):
    def load(self, key, record):
        return self.get(key)


def run(watch, table, records):
    writes, alerts = watch.process(records, table.load)
    for key, value, _ in writes:
        table[key] = value
    return [(a.type, a.stage) for a in alerts], alerts


def test_one_alert_per_episode_summed_over_partitions_and_across_restarts():
    config, table = load_config(), Table()
    watch = ConversionWatch(config)
    # Each partition alone has too little volume to judge: the sum over partitions decides.
    half_drop = reached(mql7=10, sql7=2, mql90=110, sql90=52)
    assert run(watch, table, [partial(0, 1, half_drop)])[0] == []
    types, alerts = run(watch, table, [partial(1, 1, half_drop)])
    assert types == [("conversion.drop", "mql")]
    assert alerts[0].next_stage == "sql" and alerts[0].conversion == 0.2
    assert run(watch, table, [partial(0, 2, half_drop), partial(1, 2, half_drop)])[0] == []
    restarted = ConversionWatch(config)                                 # state is in the table
    assert run(restarted, table, [partial(0, 3, half_drop), partial(1, 3, half_drop)])[0] == []
    healthy = reached(mql7=10, sql7=5, mql90=110, sql90=55)
    types, recovered = run(restarted, table, [partial(0, 4, healthy), partial(1, 4, healthy)])
    assert types == [("conversion.recovered", "mql")]
    assert recovered[0].id != alerts[0].id


def test_an_older_partial_never_replaces_a_newer_one():
    watch, table = ConversionWatch(load_config()), Table()
    drop = reached(mql7=40, sql7=8, mql90=440, sql90=208)
    healthy = reached(mql7=40, sql7=20, mql90=440, sql90=220)
    assert run(watch, table, [partial(0, 5, drop)])[0] == [("conversion.drop", "mql")]
    assert run(watch, table, [partial(0, 4, healthy)])[0] == []
