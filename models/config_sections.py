"""The sections of the funnel config (models/config.py): stages and pipelines, owners,
dimensions, quotas, rates, conversion-drop thresholds, and the names and limits they share."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NO_TEAM = "none"  # the team of a rep the owners map gives none (docs/kpis.md, "Team leaderboard")
MAX_DIMENSIONS = 16
# The deal property a CRM's own forecast category arrives in (HubSpot hs_forecast_category,
# Salesforce ForecastCategoryName): always kept, whatever the dimensions.
FORECAST_PROPERTY = "forecast_category"
FORECAST_CATEGORIES = ("pipeline", "best_case", "commit", "closed", "omitted")
ForecastCategory = Literal["pipeline", "best_case", "commit", "closed", "omitted"]
Periods = dict[Literal["month", "quarter", "year"], float]
DIMENSION_NAME = r"^[a-z][a-z0-9_]{0,62}$"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str | float | int) -> float:
    """'30d', '12h', '90m', '45s' or plain seconds → seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30d, 12h, 90m, 45s)")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {value!r}")
    return seconds


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(StrictModel):
    name: str = Field(min_length=1, pattern=r"^[a-z][a-z0-9_]*$")
    section: Literal["tofu", "mofu", "bofu"]
    probability: float = Field(ge=0, le=1)
    stall_after: float | None = None
    outcome: Literal["won", "lost"] | None = None

    @field_validator("stall_after", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float | None:
        return None if value is None else parse_duration(value)  # type: ignore[arg-type]

    @property
    def is_open(self) -> bool:
        return self.outcome is None


class Pipeline(StrictModel):
    stages: list[Stage] = Field(min_length=2)

    @model_validator(mode="after")
    def _check_order(self) -> Pipeline:
        names = [stage.name for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        seen_closed = False
        for stage in self.stages:
            if stage.is_open and seen_closed:
                raise ValueError(f"open stage {stage.name!r} comes after a closed stage")
            seen_closed = seen_closed or not stage.is_open
            if not stage.is_open and stage.stall_after is not None:
                raise ValueError(f"closed stage {stage.name!r} cannot have stall_after")
        outcomes = [stage.outcome for stage in self.stages if stage.outcome]
        if outcomes.count("won") != 1 or outcomes.count("lost") != 1:
            raise ValueError("a pipeline needs exactly one won and one lost stage")
        if not any(stage.is_open for stage in self.stages):
            raise ValueError("a pipeline needs at least one open stage")
        return self

    @cached_property
    def by_name(self) -> dict[str, Stage]:
        return {stage.name: stage for stage in self.stages}

    @cached_property
    def open_stages(self) -> list[Stage]:
        return [stage for stage in self.stages if stage.is_open]

    @cached_property
    def open_index(self) -> dict[str, int]:
        """Open stage → position; won counts as past the last open stage, lost as nowhere."""
        index = {stage.name: i for i, stage in enumerate(self.open_stages)}
        index[self.outcome_stage("won").name] = len(self.open_stages) - 1
        return index

    def dimension_series(self, currencies: int) -> int:
        """Series one exported dimension value takes (sinks/dimensions.py): deals open and
        reached per open stage, open value per open stage and currency, closed deals per
        outcome and currency, cycle per outcome, won revenue per currency."""
        stages = len(self.open_stages)
        return 2 * stages + stages * currencies + 2 * currencies + 2 + currencies

    def outcome_stage(self, outcome: str) -> Stage:
        return next(stage for stage in self.stages if stage.outcome == outcome)


PERIODS = ("month", "quarter", "year")


class ConversionDrop(StrictModel):
    """Stage conversion over ``window`` against the rest of ``baseline`` before it.

    A drop is ``conversion < min_ratio × baseline conversion`` with at least ``min_entries``
    deals entering the stage in the window and ``min_baseline_entries`` in the baseline; the
    Prometheus rule FunnelStageConversionDrop uses the same definition and numbers.
    """

    window: Literal["7d", "30d"] = "7d"
    baseline: Literal["30d", "90d"] = "90d"
    min_ratio: float = Field(0.7, gt=0, lt=1)
    min_entries: int = Field(20, ge=1)
    min_baseline_entries: int = Field(50, ge=1)


class Owner(StrictModel):
    """A rep of the owners map written as ``{name: ..., team: ...}``."""

    name: str
    team: str = NO_TEAM


def check_owner_entry(owner: object, entry: object) -> None:
    """One clear line per mistake in an owners entry: ``id: name`` or ``id: {name, team}``."""
    if not isinstance(owner, str) or not owner.strip():
        raise ValueError(f"owner id {owner!r} must be a non-empty string (quote it)")
    if isinstance(entry, dict):
        unknown = sorted(str(key) for key in entry if key not in ("name", "team"))
        if unknown:
            raise ValueError(f"{owner}: unknown key {unknown[0]!r} (an owner has name and team)")
        if "team" in entry and (not isinstance(entry["team"], str) or not entry["team"].strip()):
            raise ValueError(f"{owner}: the team must be a non-empty string, not {entry['team']!r}")
        entry = entry.get("name")
    if not isinstance(entry, str) or not entry.strip():
        raise ValueError(f"{owner}: the name must be a non-empty string, not {entry!r}")


class Dimension(StrictModel):
    """A deal property the KPIs are broken down by (docs/kpis.md, "Dimensions").

    ``sources``: per source (``hubspot``, ``salesforce``, ``pipedrive``, ``debezium``, ``csv``)
    where its adapter and backfill read the value: a HubSpot property, a Salesforce field API
    name, a Pipedrive field key (custom fields' hash keys included), a Debezium column, a dataset
    column. ``max_values``: the values exported per pipeline, most deals first; the rest are
    summed as ``other``."""

    max_values: int = Field(20, ge=1, le=1000)
    sources: dict[str, str] = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _names(cls, value: dict[str, str]) -> dict[str, str]:
        for source, name in value.items():
            if not name.strip():
                raise ValueError(f"{source}: the property name must be a non-empty string")
        return value


class Quotas(StrictModel):
    """Won revenue expected per rep (owner id as events carry it) and per team, per period
    (docs/kpis.md, "Quotas and attainment")."""

    pipeline: str = "default"
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")  # default: see quota_currency
    reps: dict[str, Periods] = Field(default_factory=dict)
    teams: dict[str, Periods] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _non_negative(self) -> Quotas:
        for kind, entries in (("reps", self.reps), ("teams", self.teams)):
            for name, periods in entries.items():
                if any(value < 0 for value in periods.values()):
                    raise ValueError(f"quotas.{kind}.{name}: quotas must be >= 0")
        return self


class Rates(StrictModel):
    """Where dated exchange rates to the reporting currency come from (docs/kpis.md,
    "Reporting currency"): a CSV file (``date,currency,rate``: from that date on, one unit of
    the currency is ``rate`` units of the reporting currency) and/or a compacted topic another
    service writes (key ``CUR:YYYY-MM-DD``, value the rate as text)."""

    file: Path | None = None
    topic: str | None = Field(default=None, min_length=1, max_length=249)
