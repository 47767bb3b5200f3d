"""Funnel configuration (docs/design.md §1): pipelines, stages, stage maps, targets, owners,
timezone, clock.

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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG = Path(__file__).with_name("funnel.yaml")
IGNORE = "ignore"
NO_TEAM = "none"  # the team of a rep the owners map gives none (docs/kpis.md, "Team leaderboard")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class ConfigError(Exception):
    """The funnel config cannot be used; the message says where and why."""


class Clock(StrEnum):
    WALL = "wall"
    STREAM = "stream"


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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage(_Strict):
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


class Pipeline(_Strict):
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

    def outcome_stage(self, outcome: str) -> Stage:
        return next(stage for stage in self.stages if stage.outcome == outcome)


PERIODS = ("month", "quarter", "year")


class ConversionDrop(_Strict):
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


class Owner(_Strict):
    """A rep of the owners map written as ``{name: ..., team: ...}``."""

    name: str
    team: str = NO_TEAM


def _check_owner(owner: object, entry: object) -> None:
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


class FunnelConfig(_Strict):
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

    @field_validator("owners", mode="before")
    @classmethod
    def _owner_entries(cls, value: object) -> object:
        """Ids, names and teams must be non-empty strings: YAML reads ``123: Jane`` as an int key."""
        if isinstance(value, dict):
            for owner, entry in value.items():
                _check_owner(owner, entry)
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
        if "default" not in self.pipelines:
            raise ValueError("the pipeline 'default' must be configured (events without one use it)")
        for source, per_pipeline in self.stage_maps.items():
            for pipeline, mapping in per_pipeline.items():
                if pipeline not in self.pipelines:
                    raise ValueError(f"stage_maps.{source}.{pipeline}: unknown pipeline")
                stages = self.pipelines[pipeline].by_name
                for source_stage, target in mapping.items():
                    if target != IGNORE and target not in stages:
                        raise ValueError(
                            f"stage_maps.{source}.{pipeline}.{source_stage}: {target!r} is not a "
                            f"stage of {pipeline!r} (nor {IGNORE!r})"
                        )
        for pipeline, per_currency in self.targets.items():
            if pipeline not in self.pipelines:
                raise ValueError(f"targets.{pipeline}: unknown pipeline")
            for currency, periods in per_currency.items():
                if not re.fullmatch(r"[A-Z]{3}", currency):
                    raise ValueError(f"targets.{pipeline}.{currency}: not an ISO 4217 code")
                if any(value < 0 for value in periods.values()):
                    raise ValueError(f"targets.{pipeline}.{currency}: targets must be >= 0")
        return self

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
