"""Forecast by category (docs/kpis.md, "Forecast categories"), from exported samples the way the
recording rules compute it: open amounts expected to close in the period per forecast category
(``funnel_forecast_value``), the period's won revenue added to ``closed``, and the roll-ups sales
teams read. The snapshot uses it, so its figures equal the boards'."""

from __future__ import annotations

from models.config import FORECAST_CATEGORIES
from models.kpis import Samples, total

# Roll-up → the categories it adds up; pipeline and omitted count in none.
ROLLUPS = {"commit": ("commit", "closed"), "best_case": ("best_case", "commit", "closed")}


def forecast_by_category(samples: Samples, pipeline: str, currency: str,
                         period: str) -> dict[str, float] | None:
    """Category → amount in the period; None when the samples carry no forecast for the
    pipeline (a worker from before forecast categories)."""
    if not any(labels.get("pipeline") == pipeline for labels, _ in samples.get("funnel_forecast_value", ())):
        return None
    match = {"pipeline": pipeline, "currency": currency, "period": period}
    amounts = {category: total(samples, "funnel_forecast_value", category=category, **match)
               for category in FORECAST_CATEGORIES}
    amounts["closed"] += total(samples, "funnel_won_revenue_period", **match)
    return amounts


def rollups(amounts: dict[str, float]) -> dict[str, float]:
    """Roll-up → the sum of its categories' amounts."""
    return {name: sum(amounts[category] for category in categories)
            for name, categories in ROLLUPS.items()}
