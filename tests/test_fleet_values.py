"""One kept set of dimension values for the fleet, without a broker: the publisher decides it
from every partition's candidates, publishes it in the snapshots, every worker adopts its own
fleet's and exports exactly those values, so a value's figures summed over the workers are whole."""

from __future__ import annotations

import orjson

from models import aggregates as agg
from models.aggregates import NO_VALUE
from models.config import FunnelConfig, load_config
from models.dimensions import OTHER, dimension_kpis, value_limit
from models.fleet_values import CANDIDATES_PER_KEPT, KeptValues, candidates, fleet_kept
from models.fold import Fold
from models.snapshot import KpiSnapshot
from sinks.dimensions import dimension_gauges
from streams.worker.publisher import KpiPublisher, encode_partial

from .test_publisher import records, region_fold


def config(max_values: int = 2, **settings) -> FunnelConfig:
    return FunnelConfig.model_validate({**load_config().model_dump(), **settings,
                                        "dimensions": {"region": {"max_values": max_values}}})


def leads(region: str, deals: int, currency: str = "USD") -> list[tuple]:
    """``deals`` open deals of ``region`` in stage lead, 10 each."""
    return [(region, "lead", currency, 10, 0, "lead")] * deals


def snapshot_of(cfg: FunnelConfig, folds: dict[int, Fold], partial=encode_partial,
                kept: KeptValues | None = None) -> KpiSnapshot:
    """The default pipeline's snapshot from one deals partial per partition (``folds``), sent
    by workers that adopted ``kept``."""
    values = [partial(kind, partition, 1_000, cfg, fold if kind == "deals" else Fold(), kept=kept)
              for partition, fold in folds.items() for kind in ("deals", "customers")]
    out = KpiPublisher(cfg, partitions=len(folds), version="t").process(records(values),
                                                                         lambda k, r: None, 0)
    [snapshot] = [s for s in out.snapshots if s.pipeline == "default"]
    return snapshot


def test_the_publisher_keeps_the_values_with_the_most_deals_summed_over_partitions():
    """Each partition alone would keep its own big value (eu, us) and lose one of asia, apac;
    summed, asia and apac have more deals (ties by name: apac before asia). The snapshot
    publishes the choice and lists the same values, the rest in other: partly in other while
    the partials were ranked per partition, whole once their senders adopted the choice."""
    cfg = config(max_values=2)
    folds = {0: region_fold(*leads("eu", 5), *leads("asia", 4), *leads("apac", 3)),
             1: region_fold(*leads("us", 5), *leads("asia", 3), *leads("apac", 4), *leads(NO_VALUE, 1))}
    first = snapshot_of(cfg, folds)
    assert first.dimension_values_kept == {"region": ["apac", "asia"]}
    assert [(v.value, v.deals) for v in first.dimensions["region"]] == [
        ("apac", 4), ("asia", 4), ("none", 1), ("other", 16)]
    kept = KeptValues()
    kept.adopt(first)
    adopted = snapshot_of(cfg, folds, kept=kept)
    assert adopted.dimension_values_kept == first.dimension_values_kept
    assert [(v.value, v.deals) for v in adopted.dimensions["region"]] == [
        ("apac", 7), ("asia", 7), ("none", 1), ("other", 10)]


def test_the_fleets_limit_is_max_values_and_the_budget_with_every_partitions_currencies():
    """Partition 0 has USD deals only, partition 1 many currencies: the fleet's room is the one
    with all of them, so no worker has less room than the kept set needs."""
    cfg = config(max_values=1000, dimension_series_budget=2_000)
    currencies = [f"C{i:02}" for i in range(20)]
    folds = {0: region_fold(*(deal for i in range(200) for deal in leads(f"r{i:03}", 1 + i % 7))),
             1: region_fold(*(deal for i, c in enumerate(currencies) for deal in leads(f"x{i}", 1, c)))}
    found = [candidates(cfg, fold.counters[agg.DIMENSION]) for fold in folds.values()]
    kept = fleet_kept(cfg, found)["default"]["region"]
    pipeline = cfg.pipelines["default"]
    fleet_room = value_limit(cfg, pipeline, 1000, len({"USD", *currencies}))
    assert len(kept) == fleet_room < value_limit(cfg, pipeline, 1000, 1)
    assert kept[:2] == ["r006", "r013"]  # 28 values have 7 deals: the first ones by name
    assert fleet_kept(config(max_values=3), found)["default"]["region"] == ["r006", "r013", "r020"]


def test_a_partition_sends_a_bounded_number_of_candidates_not_every_value():
    cfg = config(max_values=5)
    fold = region_fold(*(deal for i in range(10_000) for deal in leads(f"v{i}", 1 + (i < 3))))
    [[pl, dimension, currencies, counts]] = orjson.loads(
        encode_partial("deals", 0, 1_000, cfg, fold))[7]
    assert (pl, dimension, currencies) == ("default", "region", ["USD"])
    assert len(counts) == CANDIDATES_PER_KEPT * 5
    assert counts[:4] == [["v0", 2], ["v1", 2], ["v2", 2], ["v10", 1]]


def test_a_worker_exports_the_fleets_values_zeros_included_and_sums_the_rest_as_other():
    """Locally big (local) but not kept by the fleet: in other. Kept by the fleet but without a
    deal here (far): exported with zeros. Sums over the values still equal the totals."""
    cfg = config(max_values=2)
    kept = KeptValues()
    kept.by_pipeline["default"] = {"region": ["near", "far"]}
    sums = region_fold(*leads("local", 9), *leads("near", 2), *leads(NO_VALUE, 1),
                       ("near", "won", "USD", 70, 3, "opportunity")).counters[agg.DIMENSION]
    ranked_here = dimension_kpis(cfg, sums)[("default", "region")]
    assert list(ranked_here.values) == ["local", "near", "none", OTHER]
    assert not ranked_here.fleet
    fleets = dimension_kpis(cfg, sums, kept)[("default", "region")]
    assert list(fleets.values) == ["near", "far", "none", OTHER]
    assert fleets.fleet and (fleets.distinct, fleets.folded, fleets.limit) == (2, 1, 2)
    assert fleets.values["far"].deals == 0 and fleets.values[OTHER].open == {"lead": 9}
    assert fleets.values["near"].won == {"USD": 70 * agg.MICRO}
    assert sum(v.deals for v in fleets.values.values()) == 13


def test_the_gauges_say_whether_the_fleets_values_are_in_use():
    cfg = config(max_values=2)
    kept = KeptValues()
    fold = region_fold(*leads("local", 9), *leads("near", 2))

    def exported() -> tuple[dict[str, float], set[str]]:
        families = {family.name: family for family in dimension_gauges(cfg, fold, kept)}
        ranking = {s.labels["pipeline"]: s.value
                   for s in families["funnel_dimension_fleet_ranking"].samples}
        return ranking, {s.labels["value"] for s in families["funnel_dimension_deals_open"].samples
                         if s.labels["pipeline"] == "default"}

    assert exported() == ({"default": 0, "lifecycle": 0}, {"local", "near", "none", OTHER})
    kept.by_pipeline["default"] = {"region": ["near", "far"]}
    assert exported() == ({"default": 1, "lifecycle": 0}, {"near", "far", "none", OTHER})


def test_a_worker_adopts_kept_values_only_from_its_own_fleets_snapshots():
    from streams.kafka.settings import Settings
    from streams.worker.app import FunnelWorker

    cfg = config(max_values=2)
    snapshot = snapshot_of(cfg, {0: region_fold(*leads("eu", 3), *leads("us", 1))})
    worker = FunnelWorker(Settings(app_id="fleet-a", partitions=1))
    kept = worker.kept_values
    for sender in ("fleet-b", None):  # a rebuild beside it; a version before snapshots named it
        worker.feed.on_accepted(snapshot, sender)
    assert kept.of("default", "region") is None
    worker.feed.on_accepted(snapshot, "fleet-a")
    assert kept.of("default", "region") == ["eu", "us"]
    worker.feed.on_accepted(snapshot.model_copy(update={"dimension_values_kept": None}), "fleet-a")
    assert kept.of("default", "region") is None  # its publisher stopped deciding: rank locally


def test_old_partials_without_candidates_still_decode_and_the_snapshot_ranks_as_before():
    def old_partial(*args, **kwargs) -> bytes:
        return orjson.dumps(orjson.loads(encode_partial(*args, **kwargs))[:7])

    cfg = config(max_values=1)
    snapshot = snapshot_of(cfg, {0: region_fold(*leads("eu", 3)), 1: region_fold(*leads("us", 2))},
                           old_partial)
    assert snapshot.dimension_values_kept is None
    assert "dimension_values_kept" not in snapshot.model_dump()
    assert [(v.value, v.deals) for v in snapshot.dimensions["region"]] == [
        ("eu", 3), ("none", 0), ("other", 2)]


def test_the_kept_values_travel_in_the_snapshot_json_and_only_with_dimensions():
    cfg = config(max_values=2)
    snapshot = snapshot_of(cfg, {0: region_fold(*leads("eu", 3))})
    back = KpiSnapshot.model_validate_json(snapshot.model_dump_json())
    assert back.dimension_values_kept == {"region": ["eu"]} and back == snapshot
    plain = FunnelConfig.model_validate({**load_config().model_dump(), "dimensions": {}})
    assert "dimension_values_kept" not in snapshot_of(plain, {0: Fold()}).model_dump()
