"""Canonical CRM event v2 (docs/design.md §2): the one input format of the deal agent.
Version 2 adds ``properties`` (the values of the configured dimensions); a v1 event is a v2
event without them.

Two ways in, one answer: :func:`decode_event` decodes with msgspec into a struct carrying the
schema's types and bounds first (checked in C) and falls back to the pydantic model only when
that is refused, so the error messages users see are pydantic's and both paths accept exactly
the same events.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

SCHEMA_VERSION = 2
MAX_MESSAGE_BYTES = 1024 * 1024
CHANGE_FIELDS = ("stage", "amount", "currency", "owner", "account", "expected_close_at", "deleted",
                 "properties")
MAX_PROPERTIES = 32  # properties per event: the config names at most 16 dimensions
PROPERTY_KEY = r"^[a-z][a-z0-9_]{0,62}$"  # as a dimension's name in the funnel config
MAX_TEXT = 512  # longest id, stage, owner or account we accept; longer is a producer bug
# Largest amount accepted (10^15 of any currency): larger is a producer bug, and an amount near
# the float limit overflowed in micro units and failed its whole batch, again on every retry.
MAX_AMOUNT = 1e15
# Earliest occurred_at accepted by default: CRMs and databases write "zero dates" (0001-01-01,
# 1900-01-01, 1970-01-01) for unknown times; such a deal would be stalled for centuries.
MIN_OCCURRED_MS = 946_684_800_000  # 2000-01-01T00:00:00Z


class RejectedEvent(Exception):
    """A message that cannot become an event; ``code`` is a bounded metric label."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# RFC 3339 timestamp → epoch ms, as _parse_ts parsed it: a plain dict emptied when full, which
# costs a third of functools.lru_cache's book-keeping on a miss (live events rarely repeat a
# millisecond timestamp; replays and batch exports repeat many).
_PARSED: dict[str, int] = {}
_PARSED_MAX = 4096


def _parse_ts(value: str) -> int:
    """RFC 3339 timestamp with an explicit offset → epoch milliseconds (cached: replays and
    batch exports repeat the same timestamps; errors are not cached and raise again)."""
    ms = _PARSED.get(value)
    if ms is None:
        ms = _parse_ts_uncached(value)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[value] = ms
    return ms


def _parse_ts_uncached(value: str) -> int:
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset (e.g. 'Z' or '+02:00')")
    try:
        return int(ts.timestamp() * 1000)
    except OverflowError:
        raise ValueError("timestamp out of range") from None


Text = Field(min_length=1, max_length=MAX_TEXT)
PropertyKey = Annotated[str, StringConstraints(pattern=PROPERTY_KEY)]
PropertyValue = Annotated[str, StringConstraints(max_length=MAX_TEXT)] | None


class CrmEvent(BaseModel):
    """Canonical CRM change event v2 (topic ``crm.events``, key = ``deal_id``)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    event_id: str = Text
    occurred_at: str = Field(json_schema_extra={"format": "date-time"})
    deal_id: str = Text
    stage: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    pipeline: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    amount: float | int | None = Field(default=None, ge=0, le=MAX_AMOUNT, allow_inf_nan=False)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    owner: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    account: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    expected_close_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    deleted: bool | None = None
    source: str | None = Field(default=None, min_length=1, max_length=64)
    # Dimension name → the deal's value (null: the CRM cleared it); names the config does not
    # list are ignored by the workers.
    properties: dict[PropertyKey, PropertyValue] | None = Field(default=None,
                                                               max_length=MAX_PROPERTIES)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)

    @field_validator("occurred_at", "expected_close_at")
    @classmethod
    def _rfc3339(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_ts(value)
        return value

    def model_post_init(self, __context: Any) -> None:
        if all(getattr(self, name) in (None, {}) for name in CHANGE_FIELDS):
            raise ValueError(f"event carries no change: needs one of {', '.join(CHANGE_FIELDS)}")


class Change(msgspec.Struct, gc=False):
    """A validated event in the shape the state machine wants (timestamps as epoch ms).

    A msgspec struct: built in C (a slots dataclass's ``__init__`` was ~0.5 µs an event) and
    untracked by the garbage collector (it holds only strings and numbers).
    """

    event_id: str
    ts: int
    deal_id: str
    stage: str | None = None
    pipeline: str | None = None
    amount: float | None = None
    currency: str | None = None
    owner: str | None = None
    account: str | None = None
    expected_close_at: int | None = None
    deleted: bool | None = None
    source: str | None = None
    properties: dict[str, str | None] | None = None


_Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
# \Z, not $: Python's "$" also matches before a final newline (pydantic's regex does not).
_PropertyKey = Annotated[str, msgspec.Meta(pattern=PROPERTY_KEY.replace("$", "\\Z"))]
_PropertyValue = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)] | None


class _Wire(msgspec.Struct, gc=False):
    """The fast path: :class:`CrmEvent`'s types and bounds, checked by msgspec while it decodes
    (in C). Anything it refuses goes to pydantic, which words the error (or accepts: the two
    must agree, see tests/test_event.py)."""

    event_id: _Text
    occurred_at: str
    deal_id: _Text
    stage: _Text | None = None
    pipeline: _Text | None = None
    amount: Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT)] | None = None  # JSON ints too
    # max_length: Python's "$" also matches before a final newline.
    currency: Annotated[str, msgspec.Meta(max_length=3, pattern=r"^[A-Z]{3}$")] | None = None
    owner: _Text | None = None
    account: _Text | None = None
    expected_close_at: str | None = None
    deleted: bool | None = None
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    properties: Annotated[dict[_PropertyKey, _PropertyValue],
                          msgspec.Meta(max_length=MAX_PROPERTIES)] | None = None
    schema_version: Annotated[int, msgspec.Meta(ge=1, le=SCHEMA_VERSION)] = SCHEMA_VERSION


_WIRE = msgspec.json.Decoder(_Wire)


def _change(event: _Wire | CrmEvent) -> Change:
    """A checked event (either path) → :class:`Change`; ``ValueError`` on a bad timestamp."""
    expected = event.expected_close_at
    return Change(
        event.event_id, _parse_ts(event.occurred_at), event.deal_id, event.stage, event.pipeline,
        None if event.amount is None else float(event.amount), event.currency, event.owner,
        event.account, None if expected is None else _parse_ts(expected), event.deleted,
        event.source, event.properties or None,
    )


def _fast_change(raw: bytes) -> Change | None:
    """The common valid case; ``None`` means "let pydantic decide"."""
    try:
        wire = _WIRE.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: deeply nested JSON
        return None
    if (
        wire.stage is None and wire.amount is None and wire.currency is None
        and wire.owner is None and wire.account is None and wire.expected_close_at is None
        and wire.deleted is None and not wire.properties
    ):
        return None
    # _change(wire), inlined: this runs for every event.
    try:
        occurred = _PARSED.get(wire.occurred_at)
        if occurred is None:  # _parse_ts, inlined
            occurred = _parse_ts_uncached(wire.occurred_at)
            if len(_PARSED) >= _PARSED_MAX:
                _PARSED.clear()
            _PARSED[wire.occurred_at] = occurred
        expected = wire.expected_close_at
        if expected is not None:
            expected = _parse_ts(expected)
    except ValueError:
        return None
    amount = wire.amount
    return Change(
        wire.event_id, occurred, wire.deal_id, wire.stage, wire.pipeline,
        None if amount is None else float(amount), wire.currency, wire.owner, wire.account,
        expected, wire.deleted, wire.source, wire.properties or None,
    )


def _slow_change(raw: bytes) -> Change:
    """pydantic's verdict, with its wording of what is wrong."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RejectedEvent("invalid_json", f"not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise RejectedEvent("invalid_event", f"event must be a JSON object, got {type(doc).__name__}")
    try:
        event = CrmEvent.model_validate(doc)
    except ValidationError as exc:
        raise RejectedEvent("invalid_event", _first_error(exc)) from None
    except ValueError as exc:  # raised by model_post_init
        raise RejectedEvent("invalid_event", str(exc)) from None
    return _change(event)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in err["loc"]) or "event"
    return f"{where}: {err['msg']}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def decode_event(raw: bytes | None, *, now_ms: int, max_skew_ms: int,
                 min_ms: int = MIN_OCCURRED_MS) -> Change:
    """Bytes from ``crm.events`` → :class:`Change`, or :class:`RejectedEvent` with a reason."""
    if raw is None:
        raise RejectedEvent("empty", "message has no value (tombstone)")
    if len(raw) > MAX_MESSAGE_BYTES:
        raise RejectedEvent("too_large", f"message is {len(raw)} bytes, limit {MAX_MESSAGE_BYTES}")
    change = _fast_change(raw)
    if change is None:
        change = _slow_change(raw)
    if change.ts > now_ms + max_skew_ms:
        raise RejectedEvent(
            "future_timestamp",
            f"occurred_at is {(change.ts - now_ms) / 1000:.0f}s in the future "
            f"(max skew {max_skew_ms / 1000:.0f}s)",
        )
    if change.ts < min_ms:
        raise RejectedEvent(
            "ancient_timestamp",
            f"occurred_at is before {_iso(min_ms)}: a placeholder date, not an event time",
        )
    return change


def encode_event(event: dict[str, Any]) -> bytes:
    """A canonical event dict → message bytes (used by replay, simulator and adapters)."""
    return orjson.dumps(event)
