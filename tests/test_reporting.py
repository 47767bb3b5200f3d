"""Reporting currency, dated rates, fiscal periods and quotas (issue 23, items 4 and 5), without
a broker: the rate table, the conversion math, and what the exporter shows for a few deals."""

from __future__ import annotations

from datetime import UTC, date, datetime
from fractions import Fraction
from zoneinfo import ZoneInfo

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from models.aggregates import deal_contribution
from models.config import ConfigError, FunnelConfig, load_config
from models.deal import Deal, apply_change
from models.event import Change
from models.fold import Fold
from models.periods import elapsed_ratio, period_bounds, period_first_hours
from models.rates import (
    ALL_TIME,
    RateBook,
    RatesError,
    RateTable,
    convert,
    load_book,
    load_rates_file,
    parse_topic_record,
)
from sinks.prometheus import KpiCollector

SHIPPED = load_config()
UTC_ZONE = ZoneInfo("UTC")


def ms(day: str) -> int:
    return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() * 1000)


def hour(day: str) -> int:
    return ms(day) // 3_600_000


def day(text: str) -> int:
    return date.fromisoformat(text).toordinal()


# ------------------------------------------------------------------ fiscal periods
def test_a_fiscal_year_from_april_moves_quarters_and_years_not_months():
    now = ms("2024-02-10T12:00:00")
    assert period_bounds(now, UTC_ZONE, "year", 4) == (ms("2023-04-01T00:00:00"), ms("2024-04-01T00:00:00"))
    quarter = (ms("2024-01-01T00:00:00"), ms("2024-04-01T00:00:00"))
    assert period_bounds(now, UTC_ZONE, "quarter", 4) == quarter
    assert period_bounds(now, UTC_ZONE, "month", 4) == period_bounds(now, UTC_ZONE, "month")
    may = ms("2024-05-16T00:00:00")
    assert period_bounds(may, UTC_ZONE, "quarter", 4)[0] == ms("2024-04-01T00:00:00")
    assert elapsed_ratio(may, UTC_ZONE, "year", 4) == pytest.approx(45 / 365)
    assert dict(period_first_hours(may, UTC_ZONE, 4))["year"] == hour("2024-04-01T00:00:00")


def test_won_in_period_and_elapsed_ratio_follow_the_fiscal_year():
    cfg = config(fiscal_year_start_month=4)
    deals = [won_deal(cfg, "march", "2024-03-20", 100.0), won_deal(cfg, "april", "2024-04-02", 40.0)]
    out = samples(cfg, deals, now="2024-05-16T00:00:00")
    year = {labels["period"]: value for labels, value in out["funnel_won_revenue_period"]
            if labels["currency"] == "USD" and labels["pipeline"] == "default"}
    assert year == {"month": 0.0, "quarter": 40.0, "year": 40.0}
    ratio = {labels["period"]: value for labels, value in out["funnel_period_elapsed_ratio"]}
    assert ratio["year"] == pytest.approx(45 / 365)


# ------------------------------------------------------------------ rates
def test_the_rate_in_force_is_the_latest_entry_on_or_before_the_date():
    table = RateTable({("EUR", day("2024-01-01")): Fraction("1.10"),
                       ("EUR", day("2024-07-01")): Fraction("1.05")})
    assert table.rate_on("EUR", day("2023-12-31")) is None
    assert table.rate_on("EUR", day("2024-01-01")) == Fraction("1.10")
    assert table.rate_on("EUR", day("2024-06-30")) == Fraction("1.10")
    assert table.rate_on("EUR", day("2030-01-01")) == Fraction("1.05")
    assert table.rate_on("GBP", day("2030-01-01")) is None


def test_the_rates_file_loads_and_each_bad_row_is_one_line_naming_file_and_line(tmp_path):
    good = tmp_path / "rates.csv"
    good.write_text("date,currency,rate\n2024-01-01,EUR,1.10\n\n# a comment\n2024-07-01,EUR,1.05\n")
    assert load_rates_file(good) == {("EUR", day("2024-01-01")): Fraction("1.1"),
                                     ("EUR", day("2024-07-01")): Fraction("1.05")}
    for row, reason in (("2024-13-01,EUR,1.1", "date '2024-13-01' is not YYYY-MM-DD"),
                        ("2024-01-01,EUR,0", "rate 0 must be positive"),
                        ("2024-01-01,EUR,-2", "rate -2 must be positive"),
                        ("2024-01-01,EUR,abc", "rate 'abc' is not a number"),
                        ("2024-01-01,eur,1", "currency 'eur' is not an ISO 4217 code"),
                        ("2024-01-01,EUR", "expected date,currency,rate, got 2 fields")):
        bad = tmp_path / "bad.csv"
        bad.write_text(f"date,currency,rate\n2024-01-01,EUR,1.1\n{row}\n")
        with pytest.raises(RatesError) as error:
            load_rates_file(bad)
        assert str(error.value) == f"{bad}:3: {reason}"
        assert isinstance(error.value, ConfigError)  # the worker refuses to start, one line
    with pytest.raises(RatesError, match=r"cannot read rates file .*missing\.csv: No such file"):
        load_book(tmp_path / "missing.csv", None)
    assert load_book(good.relative_to(tmp_path), tmp_path / "funnel.yaml").table.currencies == ["EUR"]


def test_topic_records_override_and_extend_the_file_and_a_tombstone_withdraws():
    book = RateBook({("EUR", day("2024-01-01")): Fraction("1.10")})
    book.apply([parse_topic_record(b"EUR:2024-01-01", b"1.20"),
                parse_topic_record(b"GBP:2024-03-01", b" 1.27 ")])
    assert book.table.rate_on("EUR", day("2024-02-01")) == Fraction("1.2")
    assert book.table.rate_on("GBP", day("2024-03-01")) == Fraction("1.27")
    before = book.table
    book.apply([parse_topic_record(b"EUR:2024-01-01", None)])
    assert book.table.rate_on("EUR", day("2024-02-01")) == Fraction("1.1")  # the file's again
    assert before.rate_on("EUR", day("2024-02-01")) == Fraction("1.2")  # a scrape's table stays
    for key, value in ((b"EUR", b"1"), (b"EUR:2024-02-30", b"1"), (b"EUR:2024-01-01", b"x"), (None, b"1")):
        with pytest.raises(ValueError):
            parse_topic_record(key, value)


def test_conversion_is_per_bucket_at_its_rate_exact_and_a_missing_rate_is_set_apart():
    rates = {("EUR", 1): Fraction("1.1"), ("EUR", 2): Fraction("1.3"), ("USD", 1): Fraction(1),
             ("USD", 2): Fraction(1)}
    buckets = [(("p",), "EUR", 1, 100_000_000), (("p",), "EUR", 2, 100_000_000),
               (("p",), "USD", 2, 1), (("p",), "JPY", 2, 5_000), (("q",), "EUR", 1, 3)]
    converted, missing = convert(buckets, lambda cur, h: rates.get((cur, h)),
                                 (ALL_TIME, ("late", 2, 2)))
    assert converted["all"] == {("p",): Fraction(240_000_001), ("q",): Fraction(33, 10)}
    assert converted["late"] == {("p",): Fraction(130_000_001)}
    assert missing == {(("p",), "JPY"): 5_000}  # in no sum, at any rate: not even 1:1


# ------------------------------------------------------------------ the exporter
def config(**fields) -> FunnelConfig:
    return FunnelConfig.model_validate({**SHIPPED.model_dump(), **fields})


def won_deal(cfg, deal_id, closed, amount, currency="USD", owner="ann") -> Deal:
    state = Deal(deal_id, 0)
    for i, (ts, stage) in enumerate(((ms("2023-01-01T00:00:00"), "lead"), (ms(f"{closed}T10:00:00"), "won"))):
        apply_change(state, Change(f"{deal_id}:{i}", ts, deal_id, stage=stage, amount=amount,
                                   currency=currency, owner=owner), stage, stage_ignored=False,
                     keep=cfg.dimension_names)
    return state


def open_deal(cfg, deal_id, amount, currency) -> Deal:
    state = Deal(deal_id, 0)
    apply_change(state, Change(deal_id, ms("2023-01-01T00:00:00"), deal_id, stage="sql", amount=amount,
                               currency=currency), "sql", stage_ignored=False, keep=cfg.dimension_names)
    return state


def samples(cfg, deals, now: str, rates: RateBook | None = None) -> dict[str, list]:
    folds = [Fold.of(deal_contribution(d, cfg) for d in deals[::2]),
             Fold.of(deal_contribution(d, cfg) for d in deals[1::2])]  # two partitions
    registry = CollectorRegistry()
    registry.register(KpiCollector(cfg, lambda: folds, lambda: ms(now), "test", rates))
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def value(out, name, **match) -> float:
    found = [v for labels, v in out[name] if all(labels.get(k) == x for k, x in match.items())]
    assert len(found) == 1, (name, match, out.get(name))
    return found[0]


def test_converted_won_revenue_uses_each_close_dates_rate_and_open_value_the_latest():
    cfg = config(reporting_currency="USD", targets={}, quotas={"reps": {"ann": {"quarter": 1000}}})
    book = RateBook({("EUR", day("2024-01-01")): Fraction("1.10"),
                     ("EUR", day("2024-03-01")): Fraction("1.20"),
                     ("GBP", day("2024-03-01")): Fraction("1.25")})
    deals = [
        won_deal(cfg, "e1", "2024-02-10", 100.0, "EUR"),           # 110 USD
        won_deal(cfg, "e2", "2024-03-05", 100.0, "EUR", "bob"),    # 120 USD
        won_deal(cfg, "u1", "2024-03-06", 50.5, "USD"),            # 50.5 USD, rate 1 without one
        won_deal(cfg, "g1", "2024-02-01", 10.0, "GBP"),            # no GBP rate before March
        won_deal(cfg, "j1", "2024-03-07", 999.0, "JPY"),           # no JPY rate at all
        open_deal(cfg, "o1", 200.0, "EUR"), open_deal(cfg, "o2", 40.0, "GBP"),
        open_deal(cfg, "o3", 7.0, "CHF"),
    ]
    out = samples(cfg, deals, "2024-03-10T00:00:00", book)
    assert value(out, "funnel_reporting_won_revenue", pipeline="default", currency="USD") == 280.5
    assert value(out, "funnel_reporting_won_revenue_window", pipeline="default", window="7d") == 170.5
    assert value(out, "funnel_reporting_won_revenue_period", pipeline="default", period="month") == 170.5
    assert value(out, "funnel_reporting_won_revenue_period", pipeline="default", period="year") == 280.5
    assert value(out, "funnel_reporting_open_value", pipeline="default", stage="sql") == 200 * 1.2 + 40 * 1.25
    unconverted = {(labels["currency"], labels["kind"]): v
                   for labels, v in out["funnel_reporting_unconverted_value"] if v}
    assert unconverted == {("GBP", "won"): 10.0, ("JPY", "won"): 999.0, ("CHF", "open"): 7.0}
    assert value(out, "funnel_reporting_rep_won_revenue", owner="ann") == 160.5
    assert value(out, "funnel_reporting_rep_won_revenue_period", owner="bob", period="month") == 120
    assert {labels["currency"]: v for labels, v in out["funnel_exchange_rate"]} == {
        "EUR": 1.2, "GBP": 1.25, "USD": 1.0}
    # the native gauges stay as they are
    assert value(out, "funnel_won_revenue", pipeline="default", currency="EUR") == 200
    assert value(out, "funnel_rep_won_revenue_period", owner="ann", currency="EUR", period="quarter") == 100
    assert value(out, "funnel_rep_quota", owner="ann", period="quarter") == 1000


def test_no_reporting_gauges_without_a_reporting_currency_or_a_rate_book():
    cfg = config()
    out = samples(cfg, [won_deal(cfg, "e1", "2024-02-10", 100.0, "EUR")], "2024-03-10T00:00:00", RateBook())
    assert not [name for name in out if name.startswith("funnel_reporting_")]
    out = samples(config(reporting_currency="USD"), [], "2024-03-10T00:00:00")
    assert "funnel_reporting_won_revenue" not in out


def test_quota_reps_are_exported_at_zero_in_the_quota_currency():
    cfg = config(reporting_currency="EUR", quotas={
        "currency": "EUR", "reps": {"zoe": {"month": 10}}, "teams": {"east": {"year": 100}}})
    out = samples(cfg, [], "2024-03-10T00:00:00", RateBook())
    assert value(out, "funnel_rep_won_revenue_period", owner="zoe", currency="EUR", period="year") == 0
    assert value(out, "funnel_reporting_rep_won_revenue_period", owner="zoe", period="year") == 0
    assert value(out, "funnel_team_quota", team="east", period="year", currency="EUR") == 100


def test_check_config_loads_the_rates_file_as_the_worker_does(tmp_path, capsys):
    from streams.kafka.settings import Settings
    from streams.tools.check_config import Report, _check_rates

    (tmp_path / "rates.csv").write_text("2024-01-01,EUR,1.1\n2024-02-01,GBP,-1\n")
    path = tmp_path / "funnel.yaml"
    path.write_text(config(reporting_currency="USD", rates={"file": "rates.csv"}).model_dump_json())
    report = Report()
    _check_rates(report, Settings(config=path))
    assert report.failures == [f"rates: {tmp_path / 'rates.csv'}:2: rate -1 must be positive"]
    (tmp_path / "rates.csv").write_text("2024-01-01,EUR,1.1\n")
    report = Report()
    _check_rates(report, Settings(config=path))
    assert report.lines == [("ok", "rates: reporting currency USD; file rates.csv (currencies: EUR); "
                                   "topic none")]
