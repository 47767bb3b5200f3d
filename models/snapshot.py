"""KPI snapshots on ``funnel.kpis`` (docs/design.md §5): the pydantic models are the schema source.

A snapshot is built from samples summed over every partition with the same functions the demo
uses (:mod:`models.kpis`), which divide sums exactly like the recording rules.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from models.aggregates import WINDOWS
from models.alerts import iso
from models.config import FunnelConfig
from models.dimension_kpis import DimensionValue, dimension_values
from models.forecast import forecast_by_category, rollups
from models.kpis import PipelineKpis, Samples, period_kpis, pipeline_kpis, team_leaderboard, total
from models.periods import PERIODS

SNAPSHOT_SCHEMA_VERSION = 1
LEADERBOARD_SIZE = 10


def optional(description: str) -> Any:
    """A field left out of the JSON while None: present only when the config gives it."""
    return Field(default=None, exclude_if=lambda value: value is None, description=description)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KpiSet(_Model):
    won: float
    lost: float
    win_rate: float | None
    won_revenue: float
    avg_deal_size: float | None
    avg_sales_cycle_seconds: float | None
    sales_velocity_per_second: float | None
    stage_conversion: dict[str, float | None]


class StageKpis(_Model):
    stage: str
    section: str
    probability: float
    open: float
    open_value: float
    reached: float
    conversion_to_next: float | None
    avg_time_in_stage_seconds: float | None
    stalled: float
    stalled_value: float


class RepRevenue(_Model):
    owner: str
    won_revenue: float


class TeamRevenue(_Model):
    team: str
    won_revenue: float


class CustomerValue(_Model):
    account: str
    lifetime_value: float


class Customers(_Model):
    count: float
    avg_lifetime_value: float | None
    top: list[CustomerValue]


class PeriodTarget(_Model):
    target: float | None
    won: float
    attainment: float | None
    elapsed_ratio: float
    expected_to_date: float | None
    forecast: float


class PeriodForecast(_Model):
    categories: dict[str, float] = Field(description=(
        "Open amounts expected to close in the period per forecast category (pipeline, "
        "best_case, commit, closed, omitted); closed adds the period's won revenue."))
    commit: float = Field(description="commit + closed.")
    best_case: float = Field(description="best_case + commit + closed.")


class KpiSnapshot(_Model):
    """Every derived KPI of one pipeline, all-time and per window; ``(generation, sequence)``
    only increases, across fleets too (a rebuild under a new app id outranks the old fleet):
    consumers keep a snapshot only if its pair is greater than the last one they kept."""

    schema_version: int = SNAPSHOT_SCHEMA_VERSION
    pipeline: str
    currency: str
    as_of: str
    generated_at: str
    generation: int = Field(description=(
        "Claimed by each new publisher: the previous one + 1 within a fleet (one app id); a "
        "fleet's first is the wall clock in ms, so it outranks every older fleet's."))
    sequence: int = Field(description="Counts up from 1 within a generation.")
    partitions: int
    open_deals: float
    pipeline_value: float
    weighted_pipeline: float
    all_time: KpiSet
    windows: dict[str, KpiSet]
    stages: list[StageKpis]
    leaderboard: list[RepRevenue]
    teams: list[TeamRevenue] | None = optional(
        description=(
            "Won revenue per team (the funnel config's owners give reps a team; `none` holds "
            "the reps without one), largest first, at most 10. Only present when the config "
            "gives at least one rep a team."))
    customers: Customers
    targets: dict[str, PeriodTarget]
    dimensions: dict[str, list[DimensionValue]] | None = optional(
        description=(
            "KPIs per value of each dimension the funnel config names (docs/kpis.md, "
            "\"Dimensions\"): the values with the most deals first (at most the dimension's "
            "max_values), then `none` (deals without a value) and `other` (the rest). Counts "
            "span every currency; amounts are in `currency` only. Only present when the config "
            "names dimensions."))
    dimension_values_kept: dict[str, list[str]] | None = optional(
        description=(
            "The values of each dimension the fleet keeps (docs/kpis.md, \"Dimensions\"): "
            "the values with the most deals over every partition, ties by name, at most the "
            "dimension's max_values and what the series budget leaves room for. Every worker "
            "exports exactly these values on /metrics (then `none` and `other`), and "
            "`dimensions` lists them in this order. Only present when the config names "
            "dimensions and every worker sends the counts it is decided from."))
    forecast: dict[str, PeriodForecast] | None = optional(
        description=(
            "Forecast by category per calendar period (docs/kpis.md, \"Forecast categories\"), "
            "in `currency`. Absent when the workers export no forecast by category."))


def _kpi_set(kpis: PipelineKpis) -> KpiSet:
    return KpiSet(
        won=kpis.won, lost=kpis.lost, win_rate=kpis.win_rate, won_revenue=kpis.won_revenue,
        avg_deal_size=kpis.avg_deal_size, avg_sales_cycle_seconds=kpis.avg_sales_cycle_s,
        sales_velocity_per_second=kpis.sales_velocity_per_s,
        stage_conversion={row.stage: row.conversion_to_next for row in kpis.stages[:-1]},
    )


def build_snapshot(
    samples: Samples, config: FunnelConfig, pipeline: str, *, as_of_ms: int, generated_ms: int,
    generation: int, sequence: int, partitions: int, top_customers: list[tuple[str, float]],
    kept: dict[str, list[str]] | None = None,
) -> KpiSnapshot:
    """``kept``: the fleet's kept values of the pipeline's dimensions (published, and listed in
    ``dimensions``); ``None``: ranked over the summed samples."""
    currency = config.default_currency
    kpis = pipeline_kpis(samples, pipeline, currency, top=LEADERBOARD_SIZE)
    sections = {stage.name: stage.section.upper() for stage in config.pipelines[pipeline].stages}
    opens = [stage.name for stage in config.pipelines[pipeline].open_stages]
    p = {"pipeline": pipeline}
    stages = [
        StageKpis(
            stage=row.stage, section=sections[row.stage], probability=row.probability,
            open=row.open, open_value=row.open_value, reached=row.reached,
            conversion_to_next=row.conversion_to_next,
            avg_time_in_stage_seconds=row.avg_time_in_stage_s,
            stalled=total(samples, "funnel_deals_stalled", stage=row.stage, **p),
            stalled_value=total(samples, "funnel_stalled_value", stage=row.stage,
                                currency=currency, **p),
        )
        for row in kpis.stages
    ]
    targets = {}
    for period in PERIODS:
        result = period_kpis(samples, pipeline, currency, period)
        targets[period] = PeriodTarget(
            target=result.target, won=result.won, attainment=result.attainment,
            elapsed_ratio=total(samples, "funnel_period_elapsed_ratio", period=period),
            expected_to_date=result.expected_to_date, forecast=result.forecast,
        )
    return KpiSnapshot(
        pipeline=pipeline, currency=currency, as_of=iso(as_of_ms), generated_at=iso(generated_ms),
        generation=generation, sequence=sequence, partitions=partitions,
        open_deals=kpis.open_deals, pipeline_value=kpis.pipeline_value,
        weighted_pipeline=kpis.weighted_pipeline, all_time=_kpi_set(kpis),
        windows={w: _kpi_set(pipeline_kpis(samples, pipeline, currency, window=w))
                 for w in WINDOWS},
        stages=stages,
        leaderboard=[RepRevenue(owner=o, won_revenue=v) for o, v in kpis.leaderboard],
        teams=[TeamRevenue(team=t, won_revenue=v) for t, v in team_leaderboard(
            samples, pipeline, currency, config.team_of, top=LEADERBOARD_SIZE)]
        if config.has_teams else None,
        customers=Customers(
            count=kpis.customers, avg_lifetime_value=kpis.avg_customer_lifetime_value,
            top=[CustomerValue(account=a, lifetime_value=v) for a, v in top_customers],
        ),
        targets=targets,
        dimensions=dimension_values(samples, pipeline, currency, opens, {
            name: dimension.max_values for name, dimension in config.dimensions.items()}, kept) or None,
        dimension_values_kept=kept if config.dimensions else None,
        forecast=_forecast(samples, pipeline, currency),
    )


def _forecast(samples: Samples, pipeline: str, currency: str) -> dict[str, PeriodForecast] | None:
    out = {}
    for period in PERIODS:
        amounts = forecast_by_category(samples, pipeline, currency, period)
        if amounts is None:
            return None
        out[period] = PeriodForecast(categories=amounts, **rollups(amounts))
    return out
