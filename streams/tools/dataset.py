"""The public CRM sales-opportunities dataset as canonical events (replay and tests).

One row becomes one or two events, dates at 00:00 UTC (the dataset has no times):
- Prospecting: enters ``Prospecting`` (→ sql) at the dataset's end, 2017-12-31, as no date is
  recorded; amount = the product's list price.
- Engaging: enters ``Engaging`` (→ opportunity) at ``engage_date``; amount = list price.
- Won / Lost: enters ``Engaging`` at ``engage_date`` (amount = list price), then closes at
  ``close_date`` with ``close_value``.
Owner is ``sales_agent``; account is ``account`` when present. Stage ids stay the dataset's own
and are mapped by the ``csv`` stage map of the funnel config. :func:`dataset_owners` gives the
``owners`` block of a funnel config from ``sales_teams.csv``: each agent in their manager's team.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATASET_END = "2017-12-31"
# The pipeline file says GTXPro where products.csv says GTX Pro.
PRODUCT_ALIASES = {"GTXPro": "GTX Pro"}


def _ts(date: str) -> str:
    return f"{date}T00:00:00Z"


def load_prices(folder: Path) -> dict[str, float]:
    with (folder / "products.csv").open(newline="", encoding="utf-8") as f:
        return {row["product"]: float(row["sales_price"]) for row in csv.DictReader(f)}


def load_managers(folder: Path) -> dict[str, str]:
    """``sales_teams.csv``: sales agent (the events' owner id) → manager."""
    with (Path(folder) / "sales_teams.csv").open(newline="", encoding="utf-8") as f:
        return {row["sales_agent"]: row["manager"] for row in csv.DictReader(f)}


def dataset_owners(folder: Path, *, names: dict[str, str] | None = None,
                   unlisted_managers: frozenset[str] = frozenset()) -> dict[str, dict[str, str]]:
    """The funnel config's ``owners`` with managers as teams: agent → {name, team = manager}.
    ``names`` overrides display names (default: the agent's own name); the agents of
    ``unlisted_managers`` are left out (they count in team ``none``, shown by id)."""
    names = names or {}
    return {agent: {"name": names.get(agent, agent), "team": manager}
            for agent, manager in load_managers(folder).items() if manager not in unlisted_managers}


def row_events(row: dict[str, str], prices: dict[str, float], *, prefix: str = "") -> list[dict]:
    """Events of one ``sales_pipeline.csv`` row, oldest first."""
    deal_id = f"{prefix}csv:{row['opportunity_id']}"
    stage = row["deal_stage"]
    product = PRODUCT_ALIASES.get(row["product"], row["product"])
    entry: dict[str, Any] = {
        "event_id": f"{deal_id}:entry",
        "deal_id": deal_id,
        "source": "csv",
        "owner": row["sales_agent"],
        "amount": prices[product],
        "currency": "USD",
    }
    if row["account"]:
        entry["account"] = row["account"]
    if stage == "Prospecting":
        entry.update(stage="Prospecting", occurred_at=_ts(DATASET_END))
        return [entry]
    entry.update(stage="Engaging", occurred_at=_ts(row["engage_date"]))
    if stage == "Engaging":
        return [entry]
    close = {
        "event_id": f"{deal_id}:close",
        "deal_id": deal_id,
        "source": "csv",
        "occurred_at": _ts(row["close_date"]),
        "stage": stage,
        "amount": float(row["close_value"] or 0),
    }
    return [entry, close]


def dataset_deals(folder: Path, *, prefix: str = "") -> Iterator[list[dict]]:
    """Per deal, its events in event-time order."""
    folder = Path(folder)
    prices = load_prices(folder)
    with (folder / "sales_pipeline.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            yield row_events(row, prices, prefix=prefix)


def dataset_events(folder: Path, *, copies: int = 1) -> Iterator[dict]:
    """All events deal by deal; ``copies`` > 1 replays the dataset again under fresh deal ids."""
    for copy in range(copies):
        prefix = f"c{copy}:" if copies > 1 else ""
        for events in dataset_deals(folder, prefix=prefix):
            yield from events
