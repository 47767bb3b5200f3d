"""What every CRM adapter shares: the error type, the result, and strict value parsers.

Adapters are pure functions from a raw payload to canonical events (docs/design.md §2). Every value they
copy out of a CRM payload goes through a parser here, so a bad value becomes :class:`Malformed`
with a reason instead of a crash or a guess, and every event they emit has passed the very schema
the deal agent applies (:class:`models.event.CrmEvent`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

import orjson
from pydantic import ValidationError

from models.config import FORECAST_PROPERTY, ConfigError, FunnelConfig
from models.event import CrmEvent

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_MS = 253402300799999  # 9999-12-31T23:59:59.999Z
_ID = re.compile(r"[^\s\x00-\x1f\x7f]{1,128}")
_DECIMAL = re.compile(r"-?\d{1,30}(?:\.\d{1,30})?(?:[eE][-+]?\d{1,3})?")
_AMBIGUOUS = ""


class Malformed(Exception):
    """A payload (or one record of it) that cannot become canonical events.

    ``code`` is a short, bounded label for metrics and the DLQ header; ``reason`` says what is
    wrong and where, without echoing more than a few characters of the offending value.
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Gap:
    """A CDC notice that changes happened that the payload does not describe (never guessed)."""

    entity: str
    change_type: str
    record_ids: tuple[str, ...]


@dataclass(slots=True)
class Adapted:
    """Result of adapting one raw payload; records are independent of each other.

    ``skipped`` holds bounded reason codes of records that carry nothing for the funnel,
    ``rejects`` the records that are malformed (the raw payload then goes to the DLQ).
    """

    events: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    rejects: list[Malformed] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)


# What a per-record adapter function returns: events, a skip reason code, or a gap notice.
Outcome = list[dict[str, Any]] | str | Gap


def gather(out: Adapted, adapt_one: Callable[..., Outcome], *args: Any) -> None:
    """Run one record's adapter; a record's events are kept all or none."""
    try:
        result = adapt_one(*args)
        if isinstance(result, str):
            out.skipped.append(result)
            return
        if isinstance(result, Gap):
            out.gaps.append(result)
            return
        events = [checked(event) for event in result]
    except Malformed as exc:
        out.rejects.append(exc)
        return
    except RecursionError:  # only from an already-parsed document nested beyond reason
        out.rejects.append(Malformed("too_deep", "record is nested too deeply"))
        return
    out.events.extend(events)


def checked(event: dict[str, Any]) -> dict[str, Any]:
    """Drop absent fields and validate against the canonical schema the deal agent uses."""
    event = {key: value for key, value in event.items() if value is not None}
    try:
        CrmEvent.model_validate(event)
        orjson.dumps(event)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in err["loc"]) or "event"
        raise Malformed("invalid_event", f"{where}: {err['msg']}") from None
    except ValueError as exc:  # model_post_init: no change field
        raise Malformed("invalid_event", str(exc)) from None
    except TypeError as exc:  # orjson: text that is not valid UTF-8 (lone surrogates)
        raise Malformed("invalid_text", f"event text is not valid UTF-8: {exc}") from None
    return event


def show(value: object) -> str:
    """A short rendering of an offending value for error messages (never the whole value)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
    if isinstance(value, bool | float) or value is None:
        return repr(value)
    if isinstance(value, int):
        return str(value) if abs(value) < 10**30 else "a huge integer"
    if isinstance(value, dict | list):
        return "a JSON object" if isinstance(value, dict) else "a JSON array"
    return f"a {type(value).__name__}"


def load_json(raw: bytes | str | Any, what: str) -> Any:
    """Raw bytes or text → JSON document; already-parsed documents pass through."""
    if isinstance(raw, bytes | bytearray | memoryview | str):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise Malformed("invalid_json", f"{what} is not valid JSON: {exc}") from None
    return raw


def need(doc: Mapping[str, Any], key: str, where: str) -> Any:
    value = doc.get(key)
    if value is None:
        raise Malformed("missing_field", f"{where}.{key} is missing")
    return value


def as_dict(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Malformed("bad_shape", f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def ident(value: object, where: str) -> str:
    """An id: a non-negative integer or a short text without blanks or control characters."""
    if type(value) is int and value >= 0:
        return str(value)
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    raise Malformed("bad_id", f"{where}: not an id: {show(value)}")


def text(value: object, where: str) -> str:
    """A stage or similar label: non-empty text (integers are read as their digits)."""
    if type(value) is int:
        return str(value)
    if isinstance(value, str) and value:
        return value
    raise Malformed("bad_field", f"{where}: expected text, got {show(value)}")


def amount(value: object, where: str) -> float | int:
    """A finite amount ≥ 0 from a JSON number or a plain decimal string (HubSpot sends text)."""
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            raise Malformed("bad_amount", f"{where}: not a decimal number: {show(value)}")
        number: float | int = float(value)
    elif type(value) in (int, float):
        number = value  # type: ignore[assignment]
    else:
        raise Malformed("bad_amount", f"{where}: expected a number, got {show(value)}")
    try:
        finite = math.isfinite(number)
    except OverflowError:  # an int too big for a float
        finite = False
    if not finite:
        raise Malformed("bad_amount", f"{where}: not a finite number: {show(value)}")
    if number < 0:
        raise Malformed("bad_amount", f"{where}: negative amount {show(value)}")
    return number


def currency(value: object, where: str) -> str:
    if isinstance(value, str) and len(value) == 3 and value.isascii() and value.isalpha():
        return value.upper()
    raise Malformed("bad_currency", f"{where}: not an ISO 4217 code: {show(value)}")


def from_epoch(value: object, where: str, *, unit_ms: int = 1) -> str:
    """An epoch number (``unit_ms`` ms per unit; 1 = milliseconds) → RFC 3339 UTC text."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        value = int(value)
    if type(value) is not int:
        raise Malformed("bad_timestamp", f"{where}: expected an epoch number, got {show(value)}")
    ms = value * unit_ms
    if not 0 <= ms <= _MAX_MS:
        raise Malformed("bad_timestamp", f"{where}: epoch value out of range: {show(value)}")
    return rfc3339(_EPOCH + timedelta(milliseconds=ms))


def from_iso(value: object, where: str, *, naive_utc: bool = False) -> str:
    """ISO 8601 date or timestamp text → RFC 3339 text.

    A bare date is midnight UTC of that date. A time without an offset is refused unless the
    source documents its times as UTC (``naive_utc``): never guessed.
    """
    if not isinstance(value, str) or not 10 <= len(value) <= 40:
        raise Malformed("bad_timestamp", f"{where}: expected an ISO 8601 timestamp, got {show(value)}")
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise Malformed("bad_timestamp", f"{where}: not an ISO 8601 timestamp: {show(value)}") from None
    if ts.tzinfo is None:
        if not (naive_utc or len(value) == 10):
            raise Malformed("bad_timestamp", f"{where}: timestamp without a UTC offset: {show(value)}")
        ts = ts.replace(tzinfo=UTC)
    try:
        return rfc3339(ts.astimezone(UTC))
    except (OverflowError, ValueError):
        raise Malformed("bad_timestamp", f"{where}: timestamp out of range: {show(value)}") from None


def rfc3339(ts: datetime) -> str:
    """A UTC datetime → ``2024-04-27T06:40:02.000Z`` (millisecond precision, like the sources)."""
    return f"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z"


# Where a CRM keeps its own forecast category: read like a dimension, always, with no config
# entry (docs/kpis.md, "Forecast categories"); Pipedrive and Debezium have none (the config's
# stage mapping applies).
FORECAST_FIELDS = {"hubspot": "hs_forecast_category", "salesforce": "ForecastCategoryName"}


@dataclass(frozen=True)


class Context:
    """What adapters need beyond the payload: the funnel config and source-specific choices."""

    config: FunnelConfig
    lifecycle_pipeline: str = "lifecycle"  # HubSpot contacts' lifecycle stages
    lead_pipeline: str = "lifecycle"  # Salesforce leads' Status
    debezium_columns: Mapping[str, str] = field(default_factory=dict)

    @cached_property
    def _dimensions(self) -> dict[str, dict[str, str]]:
        sources = {source for dim in self.config.dimensions.values() for source in dim.sources}
        forecast = {source: {FORECAST_PROPERTY: field} for source, field in FORECAST_FIELDS.items()}
        return {source: {**forecast.get(source, {}), **self.config.dimension_sources(source)}
                for source in sources | set(forecast)}

    def dimensions(self, source: str) -> dict[str, str]:
        """Property name → the field ``source`` keeps it in: the dimensions'
        (``dimensions.<name>.sources``) and the CRM's own forecast category (:data:`FORECAST_FIELDS`)."""
        return self._dimensions.get(source, {})

    def check(self) -> Context:
        """Refuse to start with pipelines the funnel config does not have."""
        for name, pipeline in (
            ("lifecycle pipeline", self.lifecycle_pipeline),
            ("Salesforce lead pipeline", self.lead_pipeline),
        ):
            if pipeline not in self.config.pipelines:
                raise ConfigError(
                    f"the {name} {pipeline!r} is not configured in the funnel config "
                    f"(pipelines: {', '.join(self.config.pipelines)})"
                )
        return self

    @cached_property
    def _deal_pipelines(self) -> dict[str, dict[str, str]]:
        people = {self.lifecycle_pipeline, self.lead_pipeline}
        index: dict[str, dict[str, str]] = {}
        for source, per_pipeline in self.config.stage_maps.items():
            owners = index.setdefault(source, {})
            for pipeline, mapping in per_pipeline.items():
                if pipeline in people:
                    continue
                for stage in mapping:
                    owners[stage] = pipeline if owners.get(stage, pipeline) == pipeline else _AMBIGUOUS
        return index

    def pipeline_of(self, source: str, stage: str) -> str | None:
        """The deal pipeline whose stage map lists this source stage id, if exactly one.

        CRM stage ids are unique within a portal/account across its pipelines (HubSpot, Pipedrive),
        so listing a stage id under a pipeline in ``stage_maps`` also says which pipeline a deal
        in that stage is in, whatever order the stage and pipeline changes arrive in. ``None``
        leaves the choice to the deal agent (the deal's pipeline, else ``default``).
        """
        return self._deal_pipelines.get(source, {}).get(stage) or None
