"""Derived KPIs (docs/design.md §4), computed from the exported gauges exactly as the recording rules do.

Inputs are Prometheus samples (from ``/metrics`` or the collector itself): sums are taken over
all workers and partitions first, then divided, never averaged. ``docs/kpis.md`` defines each.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from models.config import ConversionDrop

Labels = dict[str, str]
Samples = dict[str, list[tuple[Labels, float]]]


def parse_exposition(text: str) -> Samples:
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        value for labels, value in samples.get(name, ())
        if all(labels.get(k) == v for k, v in match.items())
    )


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class StageRow:
    stage: str
    open: float
    open_value: float
    reached: float
    conversion_to_next: float | None
    avg_time_in_stage_s: float | None
    probability: float


@dataclass
class PipelineKpis:
    pipeline: str
    currency: str
    window: str | None
    stages: list[StageRow] = field(default_factory=list)
    won: float = 0.0
    lost: float = 0.0
    win_rate: float | None = None
    won_revenue: float = 0.0
    avg_deal_size: float | None = None
    avg_sales_cycle_s: float | None = None
    open_deals: float = 0.0
    pipeline_value: float = 0.0
    weighted_pipeline: float = 0.0
    sales_velocity_per_s: float | None = None
    customers: float = 0.0
    avg_customer_lifetime_value: float | None = None
    leaderboard: list[tuple[str, float]] = field(default_factory=list)


def stage_order(samples: Samples, pipeline: str) -> list[tuple[str, float]]:
    """Open stages of a pipeline in funnel order with their probability (config gauges)."""
    index = {
        labels["stage"]: value for labels, value in samples.get("funnel_stage_index", ())
        if labels.get("pipeline") == pipeline
    }
    probability = {
        labels["stage"]: value for labels, value in samples.get("funnel_stage_probability", ())
        if labels.get("pipeline") == pipeline
    }
    opens = {
        labels["stage"] for labels, _ in samples.get("funnel_deals_open", ())
        if labels.get("pipeline") == pipeline
    }
    ordered = sorted((s for s in index if s in opens), key=lambda s: index[s])
    return [(stage, probability.get(stage, 0.0)) for stage in ordered]


def pipeline_kpis(
    samples: Samples, pipeline: str, currency: str, *, window: str | None = None, top: int = 10,
) -> PipelineKpis:
    """All-time KPIs of a pipeline, or those of a rolling ``window`` (7d / 30d / 90d)."""
    p = {"pipeline": pipeline}
    w = {"window": window} if window else {}
    suffix = "_window" if window else ""
    kpis = PipelineKpis(pipeline, currency, window)
    order = stage_order(samples, pipeline)
    reached = [total(samples, f"funnel_deals_reached{suffix}", stage=s, **p, **w) for s, _ in order]
    for i, (stage, probability) in enumerate(order):
        opened = total(samples, "funnel_deals_open", stage=stage, **p)
        value = total(samples, "funnel_open_value", stage=stage, currency=currency, **p)
        stays = total(samples, "funnel_stage_duration_seconds_gcount", stage=stage, **p)
        kpis.stages.append(StageRow(
            stage, opened, value, reached[i],
            ratio(reached[i + 1], reached[i]) if i + 1 < len(order) else None,
            ratio(total(samples, "funnel_stage_duration_seconds_gsum", stage=stage, **p), stays),
            probability,
        ))
        kpis.open_deals += opened
        kpis.pipeline_value += value
        kpis.weighted_pipeline += value * probability
    ttc = "funnel_time_to_close_window_seconds" if window else "funnel_time_to_close_seconds"
    closed = f"funnel_deals_closed{suffix}"
    kpis.won = total(samples, closed, outcome="won", **p, **w)
    kpis.lost = total(samples, closed, outcome="lost", **p, **w)
    kpis.win_rate = ratio(kpis.won, kpis.won + kpis.lost)
    kpis.won_revenue = total(samples, f"funnel_won_revenue{suffix}", currency=currency, **p, **w)
    kpis.avg_deal_size = ratio(kpis.won_revenue, kpis.won)
    kpis.avg_sales_cycle_s = ratio(
        total(samples, f"{ttc}_gsum", outcome="won", **p, **w),
        total(samples, f"{ttc}_gcount", outcome="won", **p, **w),
    )
    if kpis.avg_deal_size is not None and kpis.win_rate is not None and kpis.avg_sales_cycle_s:
        kpis.sales_velocity_per_s = (
            kpis.open_deals * kpis.avg_deal_size * kpis.win_rate / kpis.avg_sales_cycle_s
        )
    kpis.customers = total(samples, "funnel_customers", **p)
    kpis.avg_customer_lifetime_value = ratio(
        total(samples, "funnel_customer_lifetime_value_gsum", currency=currency, **p),
        total(samples, "funnel_customer_lifetime_value_gcount", currency=currency, **p),
    )
    reps: dict[str, float] = defaultdict(float)
    for labels, value in samples.get("funnel_rep_won_revenue", ()):
        if labels.get("pipeline") == pipeline and labels.get("currency") == currency:
            reps[labels["owner"]] += value
    kpis.leaderboard = sorted(reps.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return kpis


def team_leaderboard(
    samples: Samples, pipeline: str, currency: str, team_of: Callable[[str], str], *, top: int = 10,
) -> list[tuple[str, float]]:
    """Won revenue per team, the reps' funnel_rep_won_revenue summed under ``team_of(owner)``
    (the recording rule pipeline_team_currency:funnel_team_won_revenue:sum), largest first."""
    teams: dict[str, float] = defaultdict(float)
    for labels, value in samples.get("funnel_rep_won_revenue", ()):
        if labels.get("pipeline") == pipeline and labels.get("currency") == currency:
            teams[team_of(labels["owner"])] += value
    return sorted(teams.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


@dataclass(frozen=True)
class ConversionCheck:
    """Conversion from ``stage`` to the next one: the recent window against its baseline."""

    pipeline: str
    stage: str
    next_stage: str
    conversion: float | None
    baseline: float | None
    dropped: bool


def conversion_checks(
    reached: dict[tuple[str, str], dict[str, float]], order: dict[str, list[str]],
    rule: ConversionDrop,
) -> list[ConversionCheck]:
    """``reached[(pipeline, stage)][window]``: deals that reached the stage within the window,
    summed over all partitions. The baseline is the ``rule.baseline`` window minus the recent
    ``rule.window`` (so the two never overlap)."""
    checks = []
    for pipeline, stages in order.items():
        for stage, following in itertools.pairwise(stages):
            here = reached.get((pipeline, stage), {})
            there = reached.get((pipeline, following), {})
            entries = here.get(rule.window, 0)
            base_entries = here.get(rule.baseline, 0) - entries
            conversion = ratio(there.get(rule.window, 0), entries)
            baseline = ratio(there.get(rule.baseline, 0) - there.get(rule.window, 0), base_entries)
            dropped = (
                entries >= rule.min_entries and base_entries >= rule.min_baseline_entries
                and conversion is not None and baseline is not None
                and conversion < rule.min_ratio * baseline
            )
            checks.append(ConversionCheck(pipeline, stage, following, conversion, baseline, dropped))
    return checks


@dataclass(frozen=True)
class PeriodKpis:
    """Revenue against the target of the current calendar period (docs/design.md §4)."""

    period: str
    target: float | None
    won: float
    attainment: float | None
    expected_to_date: float | None
    forecast: float


def period_kpis(samples: Samples, pipeline: str, currency: str, period: str) -> PeriodKpis:
    p = {"pipeline": pipeline, "currency": currency, "period": period}
    won = total(samples, "funnel_won_revenue_period", **p)
    targets = [v for labels, v in samples.get("funnel_revenue_target", ())
               if all(labels.get(k) == val for k, val in p.items())]
    target = max(targets) if targets else None
    elapsed = max((v for labels, v in samples.get("funnel_period_elapsed_ratio", ())
                   if labels.get("period") == period), default=0.0)
    weighted = sum(
        value * probability
        for stage, probability in stage_order(samples, pipeline)
        for value in [total(samples, "funnel_open_value_period", stage=stage, **p)]
    )
    return PeriodKpis(
        period, target, won, ratio(won, target or 0.0),
        None if target is None else target * elapsed, won + weighted,
    )
