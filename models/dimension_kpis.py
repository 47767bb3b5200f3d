"""KPIs per dimension value in snapshots (docs/kpis.md, "Dimensions"), from summed samples.

Every partition exports the values the fleet keeps (:mod:`models.fleet_values`), and the
snapshot lists the same ones, in the publisher's order. Until the fleet has decided, each
partition exports its own kept values, so summed over partitions a value can be kept in one and
part of ``other`` in another: the values are then ranked again here and the rest summed into
``other``. Every ratio divides sums taken first, never averages of averages. Counts span every
currency; money is in ``currency`` only (the snapshot's), and the average deal size divides it
by the won deals in that currency.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from models.aggregates import NO_VALUE
from models.dimensions import OTHER, keep_most
from models.kpis import Samples, ratio


class DimensionStage(BaseModel):
    """Part of the snapshot's schema (``KpiSnapshot.dimensions``), defined beside the math so
    the rows it returns need no second copy of their fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    open: float
    open_value: float
    reached: float
    conversion_to_next: float | None


class DimensionValue(BaseModel):
    """One value of a dimension (``none``: deals without one; ``other``: values not kept)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    value: str
    deals: float
    open_deals: float
    open_value: float
    won: float
    lost: float
    win_rate: float | None
    won_revenue: float
    avg_deal_size: float | None
    avg_sales_cycle_seconds: float | None
    stages: list[DimensionStage]


def _zeros() -> defaultdict[str, float]:
    return defaultdict(float)


@dataclass
class ValueSums:
    """One value's samples summed over every partition (by stage where they have one)."""

    open: defaultdict[str, float] = field(default_factory=_zeros)
    open_value: defaultdict[str, float] = field(default_factory=_zeros)  # in the currency
    reached: defaultdict[str, float] = field(default_factory=_zeros)
    won: float = 0.0
    lost: float = 0.0
    won_in_currency: float = 0.0  # won deals whose amounts are in the currency
    won_revenue: float = 0.0
    won_cycle_seconds: float = 0.0

    @property
    def deals(self) -> float:
        """Deals in the funnel: open ones and closed ones."""
        return sum(self.open.values()) + self.won + self.lost

    def add(self, other: ValueSums) -> None:
        for mine, theirs in ((self.open, other.open), (self.open_value, other.open_value),
                             (self.reached, other.reached)):
            for key, value in theirs.items():
                mine[key] += value
        for name in ("won", "lost", "won_in_currency", "won_revenue", "won_cycle_seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def value_sums(samples: Samples, pipeline: str, dimensions: list[str],
               currency: str) -> dict[str, dict[str, ValueSums]]:
    """Dimension → value → its sums, in one pass over the samples; ``none`` and ``other``
    always (zeros when no sample names them). The guard gauges (funnel_dimension_values…) are
    per worker, not summable: not read."""
    out = {name: {NO_VALUE: ValueSums(), OTHER: ValueSums()} for name in dimensions}

    def rows(name: str, **match: str):
        for labels, value in samples.get(name, ()):
            values = out.get(labels.get("dimension", ""))
            if (values is not None and labels.get("pipeline") == pipeline
                    and all(labels.get(k) == v for k, v in match.items())):
                yield labels, values.setdefault(labels["value"], ValueSums()), value

    for labels, sums, value in rows("funnel_dimension_deals_open"):
        sums.open[labels["stage"]] += value
    for labels, sums, value in rows("funnel_dimension_open_value", currency=currency):
        sums.open_value[labels["stage"]] += value
    for labels, sums, value in rows("funnel_dimension_deals_reached"):
        sums.reached[labels["stage"]] += value
    for labels, sums, value in rows("funnel_dimension_deals_closed"):
        if labels.get("outcome") == "won":
            sums.won += value
            sums.won_in_currency += value if labels.get("currency") == currency else 0.0
        elif labels.get("outcome") == "lost":
            sums.lost += value
    for _, sums, value in rows("funnel_dimension_time_to_close_seconds", outcome="won"):
        sums.won_cycle_seconds += value
    for _, sums, value in rows("funnel_dimension_won_revenue", currency=currency):
        sums.won_revenue += value
    return out


def value_kpis(value: str, sums: ValueSums, stages: list[str]) -> DimensionValue:
    """``stages``: the pipeline's open stages in funnel order."""
    reached = [sums.reached.get(stage, 0.0) for stage in stages]
    return DimensionValue(
        value=value, deals=sums.deals, open_deals=sum(sums.open.values()),
        open_value=sum(sums.open_value.values()), won=sums.won, lost=sums.lost,
        win_rate=ratio(sums.won, sums.won + sums.lost), won_revenue=sums.won_revenue,
        avg_deal_size=ratio(sums.won_revenue, sums.won_in_currency),
        avg_sales_cycle_seconds=ratio(sums.won_cycle_seconds, sums.won),
        stages=[
            DimensionStage(
                stage=stage, open=sums.open.get(stage, 0.0),
                open_value=sums.open_value.get(stage, 0.0), reached=reached[i],
                conversion_to_next=ratio(reached[i + 1], reached[i]) if i + 1 < len(stages) else None,
            )
            for i, stage in enumerate(stages)
        ],
    )


def dimension_values(samples: Samples, pipeline: str, currency: str, stages: list[str],
                     limits: dict[str, int], kept: dict[str, list[str]] | None = None,
                     ) -> dict[str, list[DimensionValue]]:
    """Each dimension of ``limits`` (name → values kept at most), in its order: its values with
    their KPIs, at most the limit kept (``kept``: the fleet's kept values of each dimension),
    then ``none`` and ``other``."""
    found = value_sums(samples, pipeline, list(limits), currency)
    return {name: [value_kpis(value, sums, stages) for value, sums in keep_most(
                found[name], limit, ValueSums, (kept or {}).get(name))[0].items()]
            for name, limit in limits.items()}
