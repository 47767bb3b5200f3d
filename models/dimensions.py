"""KPIs per dimension value, and the cardinality guard (docs/kpis.md, "Dimensions").

The fold keeps one ``DIMENSION`` sum per (pipeline, dimension, value, stage, currency, furthest
stage): every value a deal ever had, exactly. What is *exported* is bounded: per pipeline and
dimension the values with the most deals are kept, at most the dimension's ``max_values`` and
as many as the worker's series budget leaves room for; the rest are summed as ``other``, and
deals without a value count as ``none``. Summing is all the guard does, so the sum over the
exported values of any KPI equals its total. Which values are kept is the fleet's decision once
its publisher has made one (:mod:`models.fleet_values`): every worker then keeps the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, Self, TypeVar

from models.aggregates import NO_VALUE, unpack_dimension
from models.config import FunnelConfig, Pipeline

if TYPE_CHECKING:
    from models.fleet_values import KeptValues

OTHER = "other"  # the exported value of the values beyond the limit
S = TypeVar("S", bound="_Sums")


@dataclass
class ValueKpis:
    """One value's sums (money in micro units, durations in ms)."""

    deals: int = 0                                                    # in the funnel
    open: dict[str, int] = field(default_factory=dict)                # stage → deals
    open_value: dict[tuple[str, str], int] = field(default_factory=dict)  # (stage, currency)
    furthest: dict[str, int] = field(default_factory=dict)            # furthest stage → deals
    closed: dict[tuple[str, str], int] = field(default_factory=dict)  # (outcome, currency) → deals
    cycle_ms: dict[str, int] = field(default_factory=dict)            # outcome → ms
    won: dict[str, int] = field(default_factory=dict)                 # currency → micro

    def add_deals(self, pipeline: Pipeline, stage: str, currency: str, furthest: str,
                  deals: int, cycle_ms: int, micro: int) -> None:
        """The deals of one fold key (their current stage, currency, furthest stage reached)."""
        self.deals += deals
        self.furthest[furthest] = self.furthest.get(furthest, 0) + deals
        outcome = pipeline.by_name[stage].outcome
        if outcome is None:
            self.open[stage] = self.open.get(stage, 0) + deals
            key = (stage, currency)
            self.open_value[key] = self.open_value.get(key, 0) + micro
            return
        key = (outcome, currency)
        self.closed[key] = self.closed.get(key, 0) + deals
        self.cycle_ms[outcome] = self.cycle_ms.get(outcome, 0) + cycle_ms
        if outcome == "won":
            self.won[currency] = self.won.get(currency, 0) + micro

    def add(self, other: ValueKpis) -> None:
        self.deals += other.deals
        for mine, theirs in ((self.open, other.open), (self.open_value, other.open_value),
                             (self.furthest, other.furthest), (self.closed, other.closed),
                             (self.cycle_ms, other.cycle_ms), (self.won, other.won)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value

    def reached(self, pipeline: Pipeline) -> dict[str, int]:
        """Open stage → deals that got at least that far (as ``funnel_deals_reached``)."""
        counts = [0] * len(pipeline.open_stages)
        for stage, deals in self.furthest.items():
            if stage:
                counts[pipeline.open_index[stage]] += deals
        out, running = {}, 0
        for stage, count in zip(reversed(pipeline.open_stages), reversed(counts), strict=True):
            running += count
            out[stage.name] = running
        return {stage.name: out[stage.name] for stage in pipeline.open_stages}


@dataclass
class DimensionKpis:
    """One pipeline and dimension as exported: ``values`` holds the kept values, then
    ``none`` and ``other`` (always, zero or not)."""

    values: dict[str, ValueKpis]
    currencies: list[str]
    distinct: int  # distinct values with deals (``none`` not counted)
    folded: int    # of them, summed as ``other``
    limit: int     # values kept at most (the dimension's max_values, or less for the budget)
    fleet: bool    # whether the values kept are the fleet's (else ranked by this worker)


def pair_budget(config: FunnelConfig) -> int:
    """The series budget's share of each (pipeline, dimension)."""
    return config.dimension_series_budget // max(1, len(config.pipelines) * len(config.dimensions))


def budget_statement(config: FunnelConfig) -> str:
    """What the worker says at start-up: the dimensions, their limits and the series budget."""
    named = ", ".join(f"{name} (up to {dim.max_values} values)" for name, dim in config.dimensions.items())
    one_currency = ", ".join(f"{pipeline.dimension_series(1)} on {pl}"
                             for pl, pipeline in config.pipelines.items())
    return (f"dimensions {named}: series budget {config.dimension_series_budget}, "
            f"{pair_budget(config)} per pipeline and dimension; a value takes "
            f"{one_currency} series with one currency (more with more currencies: fewer values "
            "are then kept, the rest summed as other)")


def _by_value(config: FunnelConfig, sums: dict[tuple, int]) -> dict[tuple[str, str], dict]:
    """(pipeline, dimension) → value → its :class:`ValueKpis`, from the fold's sums."""
    out: dict[tuple[str, str], dict[str, ValueKpis]] = {}
    names = list(config.dimensions)
    for (pl, values, stage, currency, furthest), packed in sums.items():
        pipeline = config.pipelines.get(pl)
        if pipeline is not None and len(values) == len(names):  # else: another config's fold
            parts = unpack_dimension(packed)
            for name, value in zip(names, values, strict=True):
                per_value = out.setdefault((pl, name), {})
                kpis = per_value.get(value)
                if kpis is None:
                    kpis = per_value[value] = ValueKpis()
                kpis.add_deals(pipeline, stage, currency, furthest, *parts)
    return out


def value_limit(config: FunnelConfig, pipeline: Pipeline, max_values: int, currencies: int) -> int:
    """Values kept at most: ``max_values``, and the room the series budget leaves with
    ``currencies`` currencies once ``none`` and ``other`` have theirs."""
    room = pair_budget(config) // pipeline.dimension_series(currencies) - 2
    return max(0, min(max_values, room))


def dimension_kpis(config: FunnelConfig, sums: dict[tuple, int],
                   kept: KeptValues | None = None) -> dict[tuple[str, str], DimensionKpis]:
    """Every configured (pipeline, dimension), guarded: see the module's docstring. ``kept``:
    the fleet's kept values, where it has decided them; elsewhere the values are ranked here."""
    found = _by_value(config, sums)
    out = {}
    for pl, pipeline in config.pipelines.items():
        for name, dimension in config.dimensions.items():
            values = found.get((pl, name), {})
            currencies = sorted({config.default_currency}
                                | {c for v in values.values() for _, c in v.open_value}
                                | {c for v in values.values() for _, c in v.closed})
            limit = value_limit(config, pipeline, dimension.max_values, len(currencies))
            distinct = len(values) - (NO_VALUE in values)
            fleet = kept.of(pl, name) if kept is not None else None
            exported, folded = keep_most(values, limit, ValueKpis, fleet)
            out[pl, name] = DimensionKpis(exported, currencies, distinct, folded, limit, fleet is not None)
    return out


class _Sums(Protocol):
    """What :func:`keep_most` needs of a value's sums."""

    @property
    def deals(self) -> float: ...

    def add(self, other: Self) -> None: ...


def keep_most(values: dict[str, S], limit: int, empty: Callable[[], S],
              kept: list[str] | None = None) -> tuple[dict[str, S], int]:
    """The guard itself, for the worker's folds and the snapshot's summed samples alike: the
    ``limit`` values with the most deals (then by name), or with ``kept`` (the fleet's choice,
    in its order) those values, zeros included, so every worker exports the same ones; then
    ``none`` and ``other``, which also sums the values not kept (and a value spelled "other");
    values without deals are left out. Also how many values with deals were summed into ``other``."""
    none, other = values.get(NO_VALUE) or empty(), empty()
    if OTHER in values:
        other.add(values[OTHER])
    ranked = sorted(((value, sums) for value, sums in values.items()
                     if value not in (NO_VALUE, OTHER) and sums.deals),
                    key=lambda kv: (-kv[1].deals, kv[0]))
    chosen = [value for value, _ in ranked] if kept is None else [
        value for value in kept if value not in (NO_VALUE, OTHER)]
    exported = {value: values.get(value) or empty() for value in chosen[:limit]}
    folded = [sums for value, sums in ranked if value not in exported]
    for sums in folded:
        other.add(sums)
    return {**exported, NO_VALUE: none, OTHER: other}, len(folded)
