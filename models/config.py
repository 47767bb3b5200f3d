"""Funnel configuration (docs/design.md §1): pipelines, stages, stage maps, targets, quotas,
owners, dimensions, reporting currency, forecast categories, timezone, fiscal year, clock.

Loaded once at start-up from YAML and validated with pydantic; everything the hot path needs is
precomputed here (stage positions, map lookups) so the agent only does dict look-ups.
"""

from __future__ import annotations

import re
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from models.config_sections import (
    DIMENSION_NAME,
    FORECAST_CATEGORIES,
    FORECAST_PROPERTY,
    MAX_DIMENSIONS,
    NO_TEAM,
    ConversionDrop,
    Dimension,
    ForecastCategory,
    Owner,
    Pipeline,
    Quotas,
    Rates,
    StrictModel,
    check_owner_entry,
    parse_duration,
)

DEFAULT_CONFIG = Path(__file__).with_name("funnel.yaml")
IGNORE = "ignore"
# Re-exported: modules read the config's sections from here.
__all__ = ["FORECAST_CATEGORIES", "FORECAST_PROPERTY", "NO_TEAM", "ConversionDrop", "FunnelConfig",
           "Pipeline", "load_config", "parse_duration"]


class ConfigError(Exception):
    """The funnel config cannot be used; the message says where and why."""


class Clock(StrEnum):
    WALL = "wall"
    STREAM = "stream"


class FunnelConfig(StrictModel):
    default_currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    timezone: str = "UTC"
    clock: Clock = Clock.WALL
    pipelines: dict[str, Pipeline] = Field(min_length=1)
    stage_maps: dict[str, dict[str, dict[str, str]]] = Field(default_factory=dict)
    targets: dict[str, dict[str, dict[Literal["month", "quarter", "year"], float]]] = Field(
        default_factory=dict
    )
    conversion_drop: ConversionDrop = Field(default_factory=ConversionDrop)
    # Owner id as events carry it (e.g. hubspot:owner:123) → display name, or → {name, team}.
    # Only labels of funnel_owner_info: state and KPIs stay keyed by the id, which live events
    # and the backfill share, so a rename or a move to another team never splits a rep in two.
    owners: dict[str, str | Owner] = Field(default_factory=dict)
    # Deal properties KPIs are broken down by, by name (the events' ``properties`` keys).
    dimensions: dict[str, Dimension] = Field(default_factory=dict, max_length=MAX_DIMENSIONS)
    # Most series the dimension gauges of one worker may take (docs/kpis.md, "Dimensions").
    dimension_series_budget: int = Field(20_000, ge=100, le=1_000_000)
    # First month of the fiscal year: quarters and years of targets and quotas follow it.
    fiscal_year_start_month: int = Field(1, ge=1, le=12)
    quotas: Quotas = Field(default_factory=Quotas)
    # One currency every amount is also reported in, converted with dated rates.
    reporting_currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    rates: Rates = Field(default_factory=Rates)
    # Pipeline → stage → forecast category, for deals whose CRM gives none.
    forecast_categories: dict[str, dict[str, ForecastCategory]] = Field(default_factory=dict)

    @field_validator("owners", mode="before")
    @classmethod
    def _owner_entries(cls, value: object) -> object:
        """Ids, names and teams must be non-empty strings: YAML reads ``123: Jane`` as an int key."""
        if isinstance(value, dict):
            for owner, entry in value.items():
                check_owner_entry(owner, entry)
        return value

    @field_validator("dimensions")
    @classmethod
    def _dimension_names(cls, value: dict[str, Dimension]) -> dict[str, Dimension]:
        for name in value:
            if not re.fullmatch(DIMENSION_NAME, name):
                raise ValueError(f"dimension {name!r}: use lower case letters, digits and _ "
                                 "(it becomes a label value and a property key)")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}") from None
        return value

    @model_validator(mode="after")
    def _check_refs(self) -> FunnelConfig:
        return _check_references(self)

    @cached_property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def owner_names(self) -> dict[str, str]:
        """Owner id → display name, whichever way the entry is written."""
        return {owner: e if isinstance(e, str) else e.name for owner, e in self.owners.items()}

    @property
    def has_teams(self) -> bool:
        """Whether any rep is given a team (the snapshot then carries the team leaderboard)."""
        return any(self.team_of(owner) != NO_TEAM for owner in self.owners)

    def team_of(self, owner: str) -> str:
        """A rep's team; :data:`NO_TEAM` when the owners map gives none or lists no such rep."""
        entry = self.owners.get(owner)
        return entry.team if isinstance(entry, Owner) else NO_TEAM

    @cached_property
    def dimension_names(self) -> frozenset[str]:
        return frozenset(self.dimensions)

    @cached_property
    def kept_properties(self) -> frozenset[str]:
        """The event properties a deal keeps: the dimensions and its CRM forecast category."""
        return self.dimension_names | {FORECAST_PROPERTY}

    @property
    def quota_currency(self) -> str:
        """The currency quotas are in: as configured, else the reporting one, else the default."""
        return self.quotas.currency or self.reporting_currency or self.default_currency

    def forecast_category(self, pipeline: str, stage: str, crm: str | None) -> str:
        """A deal's forecast category: its CRM's when it gives a known one, else the stage's
        in ``forecast_categories``, else ``closed`` when won, ``omitted`` when lost and
        ``pipeline`` when open."""
        if crm is not None:
            category = crm.replace(" ", "_")
            category = "omitted" if category == "omit" else category
            if category in FORECAST_CATEGORIES:
                return category
        mapped = self.forecast_categories.get(pipeline, {}).get(stage)
        if mapped is not None:
            return mapped
        outcome = self.pipelines[pipeline].by_name[stage].outcome
        return {"won": "closed", "lost": "omitted"}.get(outcome or "", "pipeline")

    def dimension_sources(self, source: str) -> dict[str, str]:
        """Dimension name → where ``source``'s adapter reads it (dimensions it has none for are
        left out)."""
        return {name: dim.sources[source] for name, dim in self.dimensions.items()
                if source in dim.sources}

    @cached_property
    def sources(self) -> frozenset[str]:
        """Source names with a bounded label value; others are exported as ``other``."""
        return frozenset(self.stage_maps) | {
            "csv", "simulator", "api", "hubspot", "salesforce", "pipedrive", "debezium",
        }

    def map_stage(self, source: str | None, pipeline: str, stage: str) -> str | None:
        """Source stage id → canonical stage; ``None`` for an ``ignore`` entry.

        Raises ``KeyError`` with a user-facing reason when the stage is not mapped: never guessed.
        """
        if stage in self.pipelines[pipeline].by_name:
            return stage
        # As .get(source or "", {}).get(pipeline, {}).get(stage), without the two empty dicts
        # (this runs for every event whose stage is mapped).
        target = None
        per_pipeline = self.stage_maps.get(source or "")
        if per_pipeline is not None:
            mapping = per_pipeline.get(pipeline)
            if mapping is not None:
                target = mapping.get(stage)
        if target is None:
            raise KeyError(
                f"stage {stage!r} from source {source!r} is not a stage of pipeline "
                f"{pipeline!r} and has no entry in stage_maps.{source}.{pipeline}"
            )
        return None if target == IGNORE else target


def _check_references(config: FunnelConfig) -> FunnelConfig:
    """What one field alone cannot check: names that must refer to a configured pipeline or
    stage, and room in the series budget for the dimensions."""
    if "default" not in config.pipelines:
        raise ValueError("the pipeline 'default' must be configured (events without one use it)")
    for source, per_pipeline in config.stage_maps.items():
        for pipeline, mapping in per_pipeline.items():
            if pipeline not in config.pipelines:
                raise ValueError(f"stage_maps.{source}.{pipeline}: unknown pipeline")
            stages = config.pipelines[pipeline].by_name
            for source_stage, target in mapping.items():
                if target != IGNORE and target not in stages:
                    raise ValueError(
                        f"stage_maps.{source}.{pipeline}.{source_stage}: {target!r} is not a "
                        f"stage of {pipeline!r} (nor {IGNORE!r})"
                    )
    if config.dimensions:
        # Each pipeline and dimension needs room for two values (none, other) and one more.
        pairs = len(config.pipelines) * len(config.dimensions)
        per_value = max(p.dimension_series(1) for p in config.pipelines.values())
        if config.dimension_series_budget < pairs * 3 * per_value:
            raise ValueError(
                f"dimension_series_budget {config.dimension_series_budget} is too small for "
                f"{len(config.dimensions)} dimensions on {len(config.pipelines)} pipelines: give "
                f"at least {pairs * 3 * per_value}")
    if config.quotas.pipeline not in config.pipelines:
        raise ValueError(f"quotas.pipeline: unknown pipeline {config.quotas.pipeline!r}")
    if (config.rates.file or config.rates.topic) and not config.reporting_currency:
        raise ValueError("rates: name the reporting_currency they convert to")
    for pipeline, per_stage in config.forecast_categories.items():
        if pipeline not in config.pipelines:
            raise ValueError(f"forecast_categories.{pipeline}: unknown pipeline")
        for stage in per_stage:
            if stage not in config.pipelines[pipeline].by_name:
                raise ValueError(f"forecast_categories.{pipeline}.{stage}: not a stage of "
                                 f"{pipeline!r}")
    for pipeline, per_currency in config.targets.items():
        if pipeline not in config.pipelines:
            raise ValueError(f"targets.{pipeline}: unknown pipeline")
        for currency, periods in per_currency.items():
            if not re.fullmatch(r"[A-Z]{3}", currency):
                raise ValueError(f"targets.{pipeline}.{currency}: not an ISO 4217 code")
            if any(value < 0 for value in periods.values()):
                raise ValueError(f"targets.{pipeline}.{currency}: targets must be >= 0")
    return config


def load_config(path: str | Path | None = None) -> FunnelConfig:
    """Read and validate a funnel config; :class:`ConfigError` names the file and the field."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read funnel config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return FunnelConfig.model_validate(doc)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        )
        raise ConfigError(f"{path}: {problems}") from None
