"""Gauges scanned from each partition's index of open deals: stalled deals and the value at
risk, open value expected to close in the current calendar period, per stage and per forecast
category."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from models import aggregates as agg
from models.config import FORECAST_CATEGORIES, FunnelConfig
from models.fold import NO_DATE, OPEN_DEAL, Fold, stalled_before
from models.periods import PERIODS, period_bounds


def currencies(config: FunnelConfig, pipeline: str) -> list[str]:
    """The currencies always exported for a pipeline (zero included): the default one and
    those it has targets in."""
    return sorted({config.default_currency} | set(config.targets.get(pipeline, {})))


def open_deal_gauges(config: FunnelConfig, folds: list[Fold], now_ms: int) -> Iterator[Metric]:
    """Stalls and expected closes (per stage and per forecast category), in one scan of the
    per-deal index of each partition."""
    stall_after = {
        (name, stage.name): stage.stall_after
        for name, pipeline in config.pipelines.items()
        for stage in pipeline.open_stages if stage.stall_after is not None
    }
    periods = {
        period: period_bounds(now_ms, config.zone, period, config.fiscal_year_start_month)
        for period in PERIODS
    }
    stalled: dict[tuple, int] = {}
    at_risk: dict[tuple, int] = {}
    closing: dict[tuple, int] = {}
    forecast: dict[tuple, int] = {}  # (pipeline, category, currency, period) → micro
    unpack = OPEN_DEAL.unpack
    for fold in folds:
        for (pl, stage, currency, category), group in fold.open_deals.items():
            before = stalled_before(now_ms, stall_after.get((pl, stage)))
            stalled_n = at_risk_micro = 0
            closing_micro = dict.fromkeys(periods, 0.0)
            for packed in group.values():
                entered, expected, micro, _ = unpack(packed)
                if entered < before:
                    stalled_n += 1
                    at_risk_micro += micro
                if expected != NO_DATE:
                    for period, (start, end) in periods.items():
                        if start <= expected < end:
                            closing_micro[period] += micro
            if stalled_n:
                stalled[(pl, stage)] = stalled.get((pl, stage), 0) + stalled_n
                key = (pl, stage, currency)
                at_risk[key] = at_risk.get(key, 0) + int(at_risk_micro)
            for period, micro in closing_micro.items():
                if micro:
                    key = (pl, stage, currency, period)
                    closing[key] = closing.get(key, 0) + int(micro)
                    key = (pl, category, currency, period)
                    forecast[key] = forecast.get(key, 0) + int(micro)
    count = GaugeMetricFamily("funnel_deals_stalled", "Open deals in the stage longer than "
                              "its stall_after", labels=("pipeline", "stage"))
    value = GaugeMetricFamily("funnel_stalled_value", "Amounts of stalled deals (value at risk)",
                              labels=("pipeline", "stage", "currency"))
    period_value = GaugeMetricFamily(
        "funnel_open_value_period",
        "Open amounts expected to close in the current calendar period",
        labels=("pipeline", "stage", "currency", "period"))
    for pl, stage in stall_after:
        count.add_metric((pl, stage), stalled.get((pl, stage), 0))
        for currency in currencies(config, pl):
            value.add_metric((pl, stage, currency), at_risk.get((pl, stage, currency), 0) / agg.MICRO)
    by_category = GaugeMetricFamily(
        "funnel_forecast_value",
        "Open amounts expected to close in the current calendar period, by forecast category "
        "(closed: open deals the category calls closed; the rules add won revenue)",
        labels=("pipeline", "category", "currency", "period"))
    for name, pipeline in config.pipelines.items():
        # The configured currencies and those of the deals: a deal in another one is never dropped.
        known = sorted(set(currencies(config, name)) | {key[2] for key in closing if key[0] == name})
        for stage in pipeline.open_stages:
            _add_rows(period_value, closing, (name, stage.name), known)
        for category in FORECAST_CATEGORIES:
            _add_rows(by_category, forecast, (name, category), known)
    yield from (count, value, period_value, by_category)


def _add_rows(metric: GaugeMetricFamily, sums: dict[tuple, int], labels: tuple[str, str],
              known: list[str]) -> None:
    """A row per currency and period for ``labels``, zero included (an absent series would
    hide a zero)."""
    for currency in known:
        for period in PERIODS:
            key = (*labels, currency, period)
            metric.add_metric(key, sums.get(key, 0) / agg.MICRO)
