"""Issue 23, items 4 and 5 end to end: the dataset replayed into a real worker with deals in three
currencies (every fifth deal GBP, every other third EUR, the rest USD) and a rates file with a
rate change in mid-2017: won revenue in the reporting currency (USD), per rep and per team, and
open value at the latest rate equal the same figures computed in batch from the CSV files."""

from __future__ import annotations

import csv
import functools
from datetime import UTC, datetime
from fractions import Fraction

import pytest
import yaml
from aiokafka import AIOKafkaProducer

from models.kpis import total
from streams.kafka.client import client_args
from streams.kafka.topics import ensure_topics
from streams.tools.dataset import dataset_deals

from .conftest import DATASET, DATASET_EVENTS, run_async, settled, team_config, team_owners, wait_until
from .test_e2e_pipeline import replay

pytestmark = pytest.mark.broker

RATES = {"EUR": [("2016-01-01", "1.1"), ("2017-07-01", "1.2")],
         "GBP": [("2016-01-01", "1.31"), ("2017-06-15", "1.27")]}


def currency_of(index: int) -> str:
    """The currency the test gives the ``index``-th deal of sales_pipeline.csv."""
    return "GBP" if index % 5 == 0 else "EUR" if index % 3 == 0 else "USD"


def rate(currency: str, day: str) -> Fraction:
    """The rate in force on ``day``: the latest entry on or before it (USD: 1)."""
    if currency == "USD":
        return Fraction(1)
    return [Fraction(r) for since, r in RATES[currency] if since <= day][-1]


def events() -> list[dict]:
    out = []
    for index, deal in enumerate(dataset_deals(DATASET)):
        for event in deal:
            if "currency" in event:
                event["currency"] = currency_of(index)
            out.append(event)
    return out


def batch() -> dict[str, dict[str, Fraction]]:
    """From the CSV alone, in USD: won revenue (each close at its close date's rate) in total,
    in 2017, per rep and per team, and open value per stage at the rate in force on 2017-12-31
    (the stream clock), each product's list price being an open deal's amount."""
    with (DATASET / "products.csv").open(newline="", encoding="utf-8") as f:
        prices = {row["product"]: Fraction(row["sales_price"]) for row in csv.DictReader(f)}
    teams = {agent: entry["team"] for agent, entry in team_owners().items()}
    out: dict[str, dict[str, Fraction]] = {"won": {}, "rep": {}, "team": {}, "open": {}}

    def add(kind: str, key: str, value: Fraction) -> None:
        out[kind][key] = out[kind].get(key, Fraction(0)) + value

    with (DATASET / "sales_pipeline.csv").open(newline="", encoding="utf-8") as f:
        for index, row in enumerate(csv.DictReader(f)):
            currency, stage = currency_of(index), row["deal_stage"]
            if stage == "Won":
                value = Fraction(row["close_value"] or 0) * rate(currency, row["close_date"])
                add("won", "all", value)
                if row["close_date"] >= "2017-01-01":
                    add("won", "year", value)
                add("rep", row["sales_agent"], value)
                add("team", teams.get(row["sales_agent"], "none"), value)
            elif stage in ("Prospecting", "Engaging"):
                price = prices[{"GTXPro": "GTX Pro"}.get(row["product"], row["product"])]
                add("open", {"Prospecting": "sql", "Engaging": "opportunity"}[stage],
                    price * rate(currency, "2017-12-31"))
    return out


def test_reporting_currency_figures_equal_the_batch_computation(broker, workers, tmp_path):
    config = team_config(tmp_path / "funnel.yaml")
    (tmp_path / "rates.csv").write_text("date,currency,rate\n" + "".join(
        f"{since},{currency},{value}\n" for currency, rows in RATES.items() for since, value in rows))
    doc = yaml.safe_load(config.read_text())
    doc["quotas"] = {"reps": {"Darcel Schlecht": {"year": 1_000_000}}}
    config.write_text(yaml.safe_dump(doc))
    worker = workers("w1", FUNNEL_CLOCK="stream", FUNNEL_CONFIG=str(config))
    worker.wait_ready()
    replay(broker, events())
    samples = settled([worker], DATASET_EVENTS, timeout=180)
    expected = batch()
    default = {"pipeline": "default", "currency": "USD"}
    clock = datetime.fromtimestamp(total(samples, "funnel_clock_timestamp_seconds"), UTC)
    assert clock.date().isoformat() == "2017-12-31"
    assert total(samples, "funnel_reporting_won_revenue", **default) == float(expected["won"]["all"])
    assert total(samples, "funnel_reporting_won_revenue_period", period="year", **default) == (
        float(expected["won"]["year"]))
    for stage, value in expected["open"].items():
        assert total(samples, "funnel_reporting_open_value", stage=stage, **default) == float(value)
    reps = {labels["owner"]: value for labels, value in samples["funnel_reporting_rep_won_revenue"]
            if labels["pipeline"] == "default" and value}
    assert reps == {owner: float(value) for owner, value in expected["rep"].items()}
    team_of = {labels["owner"]: labels["team"] for labels, _ in samples["funnel_owner_info"]}
    per_team: dict[str, float] = {}
    for owner, value in reps.items():
        per_team[team_of.get(owner, "none")] = per_team.get(team_of.get(owner, "none"), 0) + value
    assert per_team == pytest.approx({team: float(v) for team, v in expected["team"].items()}, rel=1e-12)
    assert not [v for _, v in samples["funnel_reporting_unconverted_value"] if v]
    # the native gauges are untouched: three currencies, never added
    native = {labels["currency"] for labels, value in samples["funnel_won_revenue"] if value}
    assert native == {"USD", "EUR", "GBP"}
    assert total(samples, "funnel_reporting_rep_won_revenue_period", owner="Darcel Schlecht",
                 period="year") > 0


def test_rates_from_the_topic_override_the_file_and_are_followed_live(broker, workers, tmp_path):
    """The worker reads the compacted rates topic from its start (records written before it
    started), keeps following it, lets it override the file (EUR 1.1 there), and skips a record
    it cannot read."""
    config = team_config(tmp_path / "funnel.yaml")
    doc = yaml.safe_load(config.read_text())
    doc["rates"]["topic"] = "fx.rates"
    config.write_text(yaml.safe_dump(doc))
    send = functools.partial(_send, broker.url, "fx.rates")
    run_async(ensure_topics(broker.url, {"fx.rates": 1}, replication_factor=1,
                            configs={"fx.rates": {"cleanup.policy": "compact"}}))
    run_async(send([(b"EUR:2017-01-01", b"1.25"), (b"GBP:2000-01-01", b"1.3"), (b"bad", b"1")]))
    worker = workers("w1", FUNNEL_CONFIG=str(config))  # wall clock: today's rates
    worker.wait_ready()

    def rates() -> dict[str, float]:
        return {labels["currency"]: value
                for labels, value in (worker.samples() or {}).get("funnel_exchange_rate", [])}
    wait_until(lambda: rates() == {"USD": 1, "EUR": 1.25, "GBP": 1.3}, 60, what="rates from the topic",
               show=lambda: repr(rates()))
    run_async(send([(b"EUR:2020-01-01", b"1.05"), (b"GBP:2000-01-01", None)]))
    wait_until(lambda: rates() == {"USD": 1, "EUR": 1.05}, 60, what="a new rate and a withdrawn one",
               show=lambda: repr(rates()))
    assert "rates topic fx.rates" in worker.log_path.read_text()  # the bad record, named


async def _send(url: str, topic: str, records: list[tuple[bytes, bytes | None]]) -> None:
    producer = AIOKafkaProducer(**client_args(url))
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, key=key, value=value)
    finally:
        await producer.stop()
