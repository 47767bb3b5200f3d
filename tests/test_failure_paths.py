"""Failure paths without a broker (issue 18): a batch that fails mid-way leaves nothing behind in
memory, a revoke overtakes a late recovery, customer rows stay small, the fleet clock ignores an
outlier."""

import orjson
import pytest
from prometheus_client import CollectorRegistry

import streams.processor as processor_module
from models.aggregates import Fold
from models.config import Clock, load_config
from sinks.prometheus import ProcessMetrics
from streams.processor import DealProcessor, EventClock, Record

CONFIG = load_config()


def deal_processor():
    registry = CollectorRegistry()
    proc = DealProcessor(CONFIG, EventClock(Clock.STREAM), ProcessMetrics(registry),
                         max_skew_ms=86_400_000)
    proc.folds.rebuild({0}, ())
    return proc, registry


def event(deal_id, n, **change):
    return Record(None, orjson.dumps({"event_id": f"{deal_id}-{n}", "deal_id": deal_id,
                                      "source": "api", "amount": 100.0 * n, "account": "Acme",
                                      "occurred_at": f"2024-01-0{n}T00:00:00Z", **change}),
                  "crm.events", 0, n)


def rebuilt_fold(proc, store):
    return Fold.of(proc.contribution_of_stored(raw)[1] for raw in store.values()).snapshot()


class FailingContribution:
    """``deal_contribution`` that raises for one deal once it is won: the second deal of a batch
    fails after the first deal's fold update (a bug, a corrupt value, a config mismatch)."""

    def __init__(self, deal_id):
        self.deal_id = deal_id
        self.real = processor_module.deal_contribution

    def __call__(self, deal, config):
        if deal.deal_id == self.deal_id and deal.history and deal.history[-1][2] == "won":
            raise ValueError("contribution failed")
        return self.real(deal, config)


def test_a_batch_that_fails_mid_way_leaves_the_folds_as_the_store_says_on_every_retry(monkeypatch):
    proc, _ = deal_processor()
    store = {}
    first = proc.process([event("d1", 1, stage="lead"), event("d2", 1, stage="lead")],
                         lambda key, _: store.get(key))
    store.update((deal_id, value) for deal_id, value, _ in first.writes)
    monkeypatch.setattr(processor_module, "deal_contribution", FailingContribution("d2"))
    batch = [event("d1", 2, stage="won"), event("d2", 2, stage="won"), event("d3", 2, stage="lead")]
    for _ in range(3):  # what the events consumer does: seek back and read the batch again
        with pytest.raises(ValueError, match="contribution failed"):
            proc.process(batch, lambda key, _: store.get(key))
        assert proc.folds.folds[0].snapshot() == rebuilt_fold(proc, store)
    monkeypatch.undo()
    done = proc.process(batch, lambda key, _: store.get(key))
    store.update((deal_id, value) for deal_id, value, _ in done.writes)
    assert proc.folds.folds[0].snapshot() == rebuilt_fold(proc, store)
    won = proc.folds.folds[0].counters["closed"][("default", "won")]
    assert won == 2
