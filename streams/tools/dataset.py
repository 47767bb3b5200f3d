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
Dimensions (the config's ``dimensions.<name>.sources.csv``) name a column of the pipeline row
or of the account, product or sales team it joins to (:data:`COLUMNS`); the deal's values are
the ``properties`` of its first event (the dataset has no history of them), empty ones left out.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

DATASET_END = "2017-12-31"
# The pipeline file says GTXPro where products.csv says GTX Pro.
PRODUCT_ALIASES = {"GTXPro": "GTX Pro"}
# The columns a dimension may name: the pipeline row's and those of the rows it joins to.
COLUMNS = {
    "sales_pipeline.csv": ("product", "account", "sales_agent"),
    "accounts.csv": ("sector", "year_established", "revenue", "employees", "office_location",
                     "subsidiary_of"),
    "products.csv": ("series", "sales_price"),
    "sales_teams.csv": ("manager", "regional_office"),
}
_JOINS = {"accounts.csv": "account", "products.csv": "product", "sales_teams.csv": "sales_agent"}


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


def row_events(row: dict[str, str], prices: dict[str, float], *, prefix: str = "",
               dimensions: Mapping[str, str] | None = None) -> list[dict]:
    """Events of one ``sales_pipeline.csv`` row, oldest first; ``dimensions`` (name → column
    of the row, see :func:`joined_rows`) become the first event's ``properties``."""
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
    properties = {name: row[column] for name, column in (dimensions or {}).items() if row.get(column)}
    if properties:
        entry["properties"] = properties
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


def _table(path: Path, key: str) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return {row[key]: row for row in csv.DictReader(f)}


def joined_rows(folder: Path, joins: Iterable[str] = tuple(_JOINS)) -> Iterator[dict[str, str]]:
    """``sales_pipeline.csv`` rows with the columns of their account, product (by its
    ``products.csv`` name) and sales team (``joins``: those files only); a row without an
    account has no account columns."""
    folder = Path(folder)
    tables = {name: _table(folder / name, _JOINS[name]) for name in joins}
    with (folder / "sales_pipeline.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            row["product"] = PRODUCT_ALIASES.get(row["product"], row["product"])
            joined: dict[str, str] = {}
            for name, table in tables.items():
                joined.update(table.get(row[_JOINS[name]], {}))
            yield {**joined, **row}


def check_columns(dimensions: Mapping[str, str]) -> None:
    known = [column for columns in COLUMNS.values() for column in columns]
    for name, column in dimensions.items():
        if column not in known:
            raise ValueError(f"dimension {name!r}: the dataset has no column {column!r} "
                             f"(it has {', '.join(known)})")


def dataset_deals(folder: Path, *, prefix: str = "",
                  dimensions: Mapping[str, str] | None = None) -> Iterator[list[dict]]:
    """Per deal, its events in event-time order; ``dimensions``: name → dataset column (the
    funnel config's ``dimension_sources("csv")``)."""
    check_columns(dimensions or {})
    prices = load_prices(Path(folder))
    columns = set((dimensions or {}).values())
    joins = [name for name, names in COLUMNS.items() if name in _JOINS and columns & set(names)]
    for row in joined_rows(folder, joins):  # only the files the dimensions read
        yield row_events(row, prices, prefix=prefix, dimensions=dimensions)


def dataset_events(folder: Path, *, copies: int = 1,
                   dimensions: Mapping[str, str] | None = None) -> Iterator[dict]:
    """All events deal by deal; ``copies`` > 1 replays the dataset again under fresh deal ids."""
    for copy in range(copies):
        prefix = f"c{copy}:" if copies > 1 else ""
        for events in dataset_deals(folder, prefix=prefix, dimensions=dimensions):
            yield from events
