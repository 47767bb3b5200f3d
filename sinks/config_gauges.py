"""Gauges that come from the funnel config and the clock: stages, targets, periods, owners."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from models.config import FunnelConfig
from models.periods import PERIODS, elapsed_ratio
from sinks.quotas import quota_config_gauges

# Identical on every worker: the recording rules aggregate them with max.
CONFIG_METRICS = frozenset({
    "funnel_stage_probability", "funnel_stage_index", "funnel_stall_after_seconds",
    "funnel_stage_info", "funnel_revenue_target", "funnel_period_elapsed_ratio",
    "funnel_build_info", "funnel_partitions", "funnel_owner_info", "funnel_dimension_series_budget",
    "funnel_stage_forecast_category",
    "funnel_rep_quota", "funnel_team_quota", "funnel_exchange_rate",
})


def config_gauges(config: FunnelConfig, version: str, now_ms: int) -> Iterator[Metric]:
    """Gauges of the config and the clock: the same on every worker (:data:`CONFIG_METRICS`)."""
    probability = GaugeMetricFamily(
        "funnel_stage_probability", "Configured win probability of a stage",
        labels=("pipeline", "stage"))
    index = GaugeMetricFamily(
        "funnel_stage_index", "Position of the stage in its pipeline (0 = first)",
        labels=("pipeline", "stage"))
    stall = GaugeMetricFamily(
        "funnel_stall_after_seconds", "Time in an open stage after which a deal is stalled",
        labels=("pipeline", "stage"))
    for name, pipeline in config.pipelines.items():
        for position, stage in enumerate(pipeline.stages):
            probability.add_metric((name, stage.name), stage.probability)
            index.add_metric((name, stage.name), position)
            if stage.stall_after is not None:
                stall.add_metric((name, stage.name), stage.stall_after)
    info = GaugeMetricFamily(
        "funnel_stage_info", "Stage metadata: its funnel section (TOFU / MOFU / BOFU)",
        labels=("pipeline", "stage", "section"))
    for name, pipeline in config.pipelines.items():
        for stage in pipeline.stages:
            info.add_metric((name, stage.name, stage.section.upper()), 1)
    target = GaugeMetricFamily(
        "funnel_revenue_target", "Configured revenue target of the calendar period",
        labels=("pipeline", "period", "currency"))
    for name, per_currency in config.targets.items():
        for currency, periods in per_currency.items():
            for period, amount in periods.items():
                target.add_metric((name, period, currency), amount)
    elapsed = GaugeMetricFamily(
        "funnel_period_elapsed_ratio", "Share of the current calendar period elapsed (clock)",
        labels=("period",))
    for period in PERIODS:
        elapsed.add_metric((period,), elapsed_ratio(now_ms, config.zone, period,
                                                   config.fiscal_year_start_month))
    build = GaugeMetricFamily("funnel_build_info", "Build of the worker", labels=("version",))
    build.add_metric((version,), 1)
    owners = GaugeMetricFamily(
        "funnel_owner_info",
        "Configured display name and team of a sales rep (owner id as in events; team none if unset)",
        labels=("owner", "name", "team"))
    for owner, name in sorted(config.owner_names.items()):
        owners.add_metric((owner, name, config.team_of(owner)), 1)
    budget = GaugeMetricFamily(
        "funnel_dimension_series_budget",
        "Most series the funnel_dimension_* KPI gauges of one worker may take (config)")
    budget.add_metric((), config.dimension_series_budget)
    yield from (probability, index, stall, info, target, elapsed, build, owners, budget)
    yield forecast_categories(config)
    yield from quota_config_gauges(config)


def forecast_categories(config: FunnelConfig) -> Metric:
    """The forecast category of each stage for deals whose CRM gives none (config
    ``forecast_categories``, else by outcome): what the boards and docs explain a row by."""
    metric = GaugeMetricFamily(
        "funnel_stage_forecast_category",
        "Forecast category of the stage's deals when their CRM gives none (config)",
        labels=("pipeline", "stage", "category"))
    for name, pipeline in config.pipelines.items():
        for stage in pipeline.stages:
            metric.add_metric((name, stage.name, config.forecast_category(name, stage.name, None)), 1)
    return metric
