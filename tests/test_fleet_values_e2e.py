"""One kept set of dimension values for the fleet, end to end: two real workers whose own
rankings of a dimension's values differ (each partition has a value of its own with more deals
than any other there, while three values spread over every partition have the most deals in
all) export the same values, the fleet's, and each value's figures summed over the workers equal
the batch figures of the events."""

from __future__ import annotations

import itertools
import json
import urllib.request

import pytest
import yaml
from aiokafka.partitioner import DefaultPartitioner

from models.config import DEFAULT_CONFIG
from models.kpis import total

from .conftest import exported_once, merged, wait_until
from .test_e2e_pipeline import replay

pytestmark = pytest.mark.broker

PARTITIONS = 4
SPREAD = ("common-1", "common-2", "common-3")  # 5 deals in each partition: 20 in all
OWN = 11   # deals of each partition's own value: the most there, and of two partitions together
STAGES = ("lead", "sql", "won", "lost")


def partition_of(deal_id: str) -> int:
    """Where the producer sends the deal's events (keyed by deal id)."""
    return DefaultPartitioner()(deal_id.encode(), list(range(PARTITIONS)), list(range(PARTITIONS)))


def events() -> list[dict]:
    """One event per deal: per partition its own value, the spread values, two deals without a
    value and two rare values."""
    wanted = {p: [f"own-{p}"] * OWN + [v for v in SPREAD for _ in range(5)] + [None, None]
              + [f"rare-{p}-a", f"rare-{p}-b"] for p in range(PARTITIONS)}
    out = []
    for n in itertools.count():
        if not any(wanted.values()):
            return out
        deal_id = f"fleet:{n}"
        values = wanted[partition_of(deal_id)]
        if values:
            value = values.pop()
            out.append({"event_id": deal_id, "deal_id": deal_id, "source": "api",
                        "occurred_at": "2024-05-01T10:00:00Z", "amount": float(n % 90 + 10),
                        "stage": STAGES[n % 4],
                        "properties": {"lead_source": value} if value else {}})


def batch(sent: list[dict], kept: tuple[str, ...]) -> dict[tuple, float]:
    """(metric, value, stage or currency) → figure, from the events: deals open per stage and
    won revenue of each kept value, ``none`` and ``other`` (every other value)."""
    out: dict[tuple, float] = {}
    for event in sent:
        value = event["properties"].get("lead_source", "none")
        value = value if value in (*kept, "none") else "other"
        if event["stage"] in ("lead", "sql"):
            key = ("funnel_dimension_deals_open", value, event["stage"])
            out[key] = out.get(key, 0) + 1
        elif event["stage"] == "won":
            key = ("funnel_dimension_won_revenue", value, "USD")
            out[key] = out.get(key, 0) + event["amount"]
    return out


def streamed(samples) -> dict[tuple, float]:
    """The same keys from the workers' samples summed."""
    out: dict[tuple, float] = {}
    for metric, label in (("funnel_dimension_deals_open", "stage"),
                          ("funnel_dimension_won_revenue", "currency")):
        for labels, value in samples.get(metric, []):
            if labels["pipeline"] == "default" and value:
                key = (metric, labels["value"], labels[label])
                out[key] = out.get(key, 0) + value
    return out


def exported_values(samples) -> set[str]:
    return {labels["value"] for labels, _ in samples.get("funnel_dimension_deals_open", [])
            if labels["pipeline"] == "default"}


def test_two_workers_export_the_fleets_kept_values_and_their_sums_equal_the_batch_figures(
        broker, workers, tmp_path):
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config = tmp_path / "funnel.yaml"
    config.write_text(yaml.safe_dump({**shipped, "dimensions": {"lead_source": {"max_values": 3}}}))
    first, second = (workers(name, FUNNEL_CONFIG=str(config)) for name in ("w1", "w2"))

    def both_serving():
        samples = [w.samples() for w in (first, second)]
        return None not in samples and all(total(s, "funnel_worker_ready") == 1 for s in samples) \
            and [total(s, "funnel_active_partitions") for s in samples] == [2, 2]

    wait_until(both_serving, 90, what="two workers with two partitions each")
    sent = events()
    replay(broker, sent)
    want = batch(sent, SPREAD)

    def converged():
        samples = [w.samples() for w in (first, second)]
        if None in samples or not exported_once(merged(samples)):
            return None
        return samples if streamed(merged(samples)) == want else None

    def difference() -> str:
        summed = streamed(merged([w.samples() or {} for w in (first, second)]))
        wrong = {key: (summed.get(key), want.get(key)) for key in sorted(set(summed) | set(want))
                 if summed.get(key) != want.get(key)}
        return f"(streamed, batch) differ at {wrong}"

    samples = wait_until(converged, 90, what="per-value sums equal to the batch figures",
                         show=difference)
    for worker_samples in samples:
        assert exported_values(worker_samples) == {*SPREAD, "none", "other"}
        lead_source = {"pipeline": "default", "dimension": "lead_source"}
        assert total(worker_samples, "funnel_dimension_fleet_ranking", **lead_source) == 1
        assert total(worker_samples, "funnel_dimension_values_folded", **lead_source) > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{first.port}/kpis/default", timeout=5) as response:
        snapshot = json.load(response)
    assert snapshot["dimension_values_kept"] == {"lead_source": list(SPREAD)}
    assert [v["value"] for v in snapshot["dimensions"]["lead_source"]] == [*SPREAD, "none", "other"]
