"""Canonical CRM event v1 (DESIGN §2): the one input format of the deal agent.

Two ways in, one answer: :func:`decode_event` tries a cheap hand-written check of the common
valid case first and falls back to the pydantic model only when that check is not sure, so the
error messages users see are pydantic's and both paths accept exactly the same events.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

SCHEMA_VERSION = 1
MAX_MESSAGE_BYTES = 1024 * 1024
CHANGE_FIELDS = ("stage", "amount", "currency", "owner", "account", "expected_close_at", "deleted")
MAX_TEXT = 512  # longest id, stage, owner or account we accept; longer is a producer bug
# Earliest occurred_at accepted by default: CRMs and databases write "zero dates" (0001-01-01,
# 1900-01-01, 1970-01-01) for unknown times; such a deal would be stalled for centuries.
MIN_OCCURRED_MS = 946_684_800_000  # 2000-01-01T00:00:00Z


class RejectedEvent(Exception):
    """A message that cannot become an event; ``code`` is a bounded metric label."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@functools.lru_cache(maxsize=4096)
def _parse_ts(value: str) -> int:
    """RFC 3339 timestamp with an explicit offset → epoch milliseconds (cached: replays and
    batch exports repeat the same timestamps; errors are not cached and raise again)."""
    ts = datetime.fromisoformat(value)
    if ts.tzinfo is None:
        raise ValueError("timestamp needs a UTC offset (e.g. 'Z' or '+02:00')")
    try:
        return int(ts.timestamp() * 1000)
    except OverflowError:
        raise ValueError("timestamp out of range") from None


Text = Field(min_length=1, max_length=MAX_TEXT)


class CrmEvent(BaseModel):
    """Canonical CRM change event v1 (topic ``crm.events``, key = ``deal_id``)."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)

    event_id: str = Text
    occurred_at: str = Field(json_schema_extra={"format": "date-time"})
    deal_id: str = Text
    stage: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    pipeline: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    amount: float | int | None = Field(default=None, ge=0, allow_inf_nan=False)
    currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$")
    owner: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    account: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT)
    expected_close_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    deleted: bool | None = None
    source: str | None = Field(default=None, min_length=1, max_length=64)
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)

    @field_validator("occurred_at", "expected_close_at")
    @classmethod
    def _rfc3339(cls, value: str | None) -> str | None:
        if value is not None:
            _parse_ts(value)
        return value

    def model_post_init(self, __context: Any) -> None:
        if all(getattr(self, name) is None for name in CHANGE_FIELDS):
            raise ValueError(f"event carries no change: needs one of {', '.join(CHANGE_FIELDS)}")


@dataclass(slots=True)
class Change:
    """A validated event in the shape the state machine wants (timestamps as epoch ms).

    Not frozen: a frozen dataclass sets each field through ``object.__setattr__``, which made
    building one a tenth of the hot path; nothing mutates a change.
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


def _fast_change(doc: dict[str, Any]) -> Change | None:
    """The common valid case checked by hand; ``None`` means "let pydantic decide"."""
    try:
        event_id = doc["event_id"]
        deal_id = doc["deal_id"]
        occurred_at = doc["occurred_at"]
    except KeyError:
        return None
    if not (type(event_id) is str and type(deal_id) is str and type(occurred_at) is str):
        return None
    if not (0 < len(event_id) <= MAX_TEXT and 0 < len(deal_id) <= MAX_TEXT):
        return None
    get = doc.get
    stage, pipeline, owner, account = get("stage"), get("pipeline"), get("owner"), get("account")
    for text in (stage, pipeline, owner, account):
        if text is not None and not (type(text) is str and 0 < len(text) <= MAX_TEXT):
            return None
    amount = get("amount")
    if amount is not None and not (
        type(amount) in (int, float) and amount >= 0 and math.isfinite(amount)
    ):
        return None
    currency = get("currency")
    if currency is not None and not (
        type(currency) is str and len(currency) == 3 and currency.isascii()
        and currency.isalpha() and currency.isupper()
    ):
        return None
    deleted = get("deleted")
    source = get("source")
    version = get("schema_version", SCHEMA_VERSION)
    if (
        (deleted is not None and type(deleted) is not bool)
        or (source is not None and not (type(source) is str and 0 < len(source) <= 64))
        or version != SCHEMA_VERSION
        or type(version) is not int
    ):
        return None
    expected = get("expected_close_at")
    try:
        ts = _parse_ts(occurred_at)
        expected_ts = None if expected is None else _parse_ts(expected)
    except (TypeError, ValueError):
        return None
    if (
        stage is None and amount is None and currency is None and owner is None
        and account is None and expected is None and deleted is None
    ):
        return None
    return Change(
        event_id, ts, deal_id, stage, pipeline,
        None if amount is None else float(amount), currency, owner, account,
        expected_ts, deleted, source,
    )


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
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RejectedEvent("invalid_json", f"not valid JSON: {exc}") from None
    if type(doc) is not dict:
        raise RejectedEvent("invalid_event", f"event must be a JSON object, got {type(doc).__name__}")
    change = _fast_change(doc)
    if change is None:
        try:
            CrmEvent.model_validate(doc)
        except ValidationError as exc:
            raise RejectedEvent("invalid_event", _first_error(exc)) from None
        except ValueError as exc:  # raised by model_post_init
            raise RejectedEvent("invalid_event", str(exc)) from None
        change = _fast_change(doc)
        if change is None:  # pydantic accepted what the fast path refused: a bug, say so
            raise RejectedEvent("invalid_event", "event passed schema but not the fast path")
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
