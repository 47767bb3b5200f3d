"""Per-deal state and the event-time state machine (docs/design.md §2).

A deal is the only source of truth for every KPI. Each field is last-write-wins by its version
``(occurred_at, event_id)`` — the event id breaks ties so the result never depends on arrival
order — and the stage history is kept sorted by the same version. Applying an event is pure:
``apply_change(deal, change, stage)`` returns the outcome and mutates only ``deal``.
How a deal is stored: :mod:`models.deal_codec`.
"""

from __future__ import annotations

import bisect
import hashlib
import operator
from collections.abc import Container
from enum import StrEnum

import msgspec

from models.event import Change

RECENT_IDS = 32      # dedup memory per deal (ids of the latest events applied)
MAX_HISTORY = 64     # stage entries kept; beyond it the oldest after the first are dropped
MAX_OWNERS = 16      # owner assignments kept (for "owner at close")
# Two entries with the same value this close in time, with no other value between them, are one
# change seen by two paths (a backfill's history record and the live webhook/CDC event: their
# ids differ, and Salesforce history times are whole seconds while CDC commit times have ms).
SAME_CHANGE_MS = 10_000

Entry = tuple[int, str, str]  # (occurred_at ms, event_id, value): history and owner entries


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    STALE = "stale"
    IGNORED = "ignored"
    REJECTED = "rejected"


class Field(msgspec.Struct, gc=False):
    """One last-write-wins field: its value and the version that wrote it.

    A msgspec struct, like :class:`Deal`: built in C (a slots dataclass's ``__init__`` cost
    twice as much, and every decoded deal and applied change builds some), and untracked by the
    garbage collector (it holds a scalar and never takes part in a cycle)."""

    value: object
    ts: int
    event_id: str


# The members, as plain names: an enum member look-up costs ~70 ns, and apply_change returns one
# for every event.
_ACCEPTED, _DUPLICATE, _STALE, _IGNORED = (
    Outcome.ACCEPTED, Outcome.DUPLICATE, Outcome.STALE, Outcome.IGNORED)
_SCALARS = ("pipeline", "amount", "currency", "account", "expected_close_at", "deleted")
_EVENT_ID = operator.itemgetter(1)  # of an Entry


class Deal(msgspec.Struct):
    """One deal's state. A msgspec struct (built in C: every loaded deal and every new one is
    built): positional and keyword construction, equality and repr as the dataclass had."""

    deal_id: str
    partition: int = -1
    pipeline: Field | None = None
    amount: Field | None = None
    currency: Field | None = None
    account: Field | None = None
    expected_close_at: Field | None = None
    deleted: Field | None = None
    history: list[Entry] = msgspec.field(default_factory=list)   # stage entries, sorted
    owners: list[Entry] = msgspec.field(default_factory=list)    # owner assignments, sorted
    recent_ids: list[str] = msgspec.field(default_factory=list)
    # Accounts this deal may have credited in the customers table (to heal after a crash).
    credited_accounts: list[str] = msgspec.field(default_factory=list)
    # The stay [stage, entered ms] a deal.stalled alert was raised for (one per stall episode).
    stall_alert: list | None = None
    # Dimension name → its normalised value (None: cleared), each last-write-wins.
    properties: dict[str, Field] = msgspec.field(default_factory=dict)

    def value(self, name: str) -> object:
        current = getattr(self, name)
        return None if current is None else current.value

    @property
    def is_deleted(self) -> bool:
        return bool(self.value("deleted"))

    @property
    def owner(self) -> str | None:
        return self.owners[-1][2] if self.owners else None

    def owner_at(self, ts: int) -> str | None:
        """Owner assigned at or before ``ts``; else the first assigned after it."""
        if not self.owners:
            return None
        i = bisect.bisect_right(self.owners, (ts, "\U0010ffff"))
        return self.owners[i - 1][2] if i else self.owners[0][2]



# Normalised property values by raw value: a dimension has few values and they repeat, so a
# plain dict emptied when full beats normalising again (as _PARSED does for timestamps).
_NORMALISED: dict[str, str | None] = {}
_NORMALISED_MAX = 4096


def normalised(value: str | None) -> str | None:
    """A property value as the KPIs group it: whitespace collapsed, case folded; blank → None."""
    if value is None:
        return None
    found = _NORMALISED.get(value, _NORMALISED)
    if found is _NORMALISED:
        found = " ".join(value.split()).casefold() or None
        if len(_NORMALISED) >= _NORMALISED_MAX:
            _NORMALISED.clear()
        _NORMALISED[value] = found
    return found  # type: ignore[return-value]


def _apply_properties(deal: Deal, change: Change, keep: Container[str]) -> bool:
    """Last-write-wins per configured property; whether any changed."""
    ts, eid = change.ts, change.event_id
    changed = False
    fields = deal.properties
    for name, value in change.properties.items():  # type: ignore[union-attr]
        if name not in keep:
            continue
        current = fields.get(name)
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            fields[name] = Field(normalised(value), ts, eid)
            changed = True
    return changed


def erased_name(name: str) -> str:
    """The pseudonym that replaces an erased owner or account: stable, not reversible."""
    return "erased:" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _insert(entries: list[Entry], entry: Entry, cap: int) -> bool:
    """Insert keeping order by version; ``False`` when the entry adds nothing.

    An entry with the same value as a neighbour within ``SAME_CHANGE_MS`` is the same change
    seen again: of such twins only the latest version is kept (the live event's commit time,
    never earlier than the history record's), whatever order they arrive in.
    """
    i = bisect.bisect_left(entries, entry)
    ts, eid, value = entry
    n = len(entries)
    twin_after = twin_before = False
    if i < n:
        after = entries[i]
        if after[0] == ts and after[1] == eid:
            return False
        twin_after = after[2] == value and abs(after[0] - ts) <= SAME_CHANGE_MS
    if i:
        before = entries[i - 1]
        twin_before = before[2] == value and abs(before[0] - ts) <= SAME_CHANGE_MS
    if twin_before or twin_after:
        twins = [j for j, twin in ((i - 1, twin_before), (i, twin_after)) if twin]
        latest = max(entry, *(entries[j] for j in twins))
        if latest is not entry and len(twins) == 1:
            return False
        for j in reversed(twins):
            del entries[j]
        entry = latest
        i = bisect.bisect_left(entries, entry)
    entries.insert(i, entry)
    if len(entries) > cap:
        del entries[1]  # keep the first entry: it anchors the cycle time
    return True


def apply_change(deal: Deal, change: Change, stage: str | None, *, stage_ignored: bool,
                 keep: Container[str] = ()) -> Outcome:
    """Apply one validated event; ``stage`` is already mapped to canonical (``None`` = absent).

    ``stage_ignored`` says the event's stage mapped to ``ignore``: if nothing else changes,
    the event counts as ``ignored`` rather than ``stale``. ``keep``: the property names kept
    (the configured dimensions); others are dropped.
    """
    ts, eid = change.ts, change.event_id
    # Deal.has_seen, inlined (this runs for every event).
    if eid in deal.recent_ids or eid in map(_EVENT_ID, deal.history):
        return _DUPLICATE
    if deal.owners and eid in map(_EVENT_ID, deal.owners):
        return _DUPLICATE
    properties = deal.properties
    if properties:
        for field in properties.values():  # a loop: a generator costs more on 1–3 fields
            if field.event_id == eid:
                return _DUPLICATE
    pipeline, amount, currency = deal.pipeline, deal.amount, deal.currency
    account, expected, deleted = deal.account, deal.expected_close_at, deal.deleted
    if ((pipeline is not None and pipeline.event_id == eid)
            or (amount is not None and amount.event_id == eid)
            or (currency is not None and currency.event_id == eid)
            or (account is not None and account.event_id == eid)
            or (expected is not None and expected.event_id == eid)
            or (deleted is not None and deleted.event_id == eid)):
        return _DUPLICATE
    changed = False
    # The scalars in _SCALARS order, spelled out (this runs for every event): a field takes
    # the value when it has none or an older version, (ts, event id) compared as a tuple.
    value = change.pipeline
    if value is not None:
        current = pipeline
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            deal.pipeline = Field(value, ts, eid)
            changed = True
    value = change.amount
    if value is not None:
        current = amount
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            deal.amount = Field(value, ts, eid)
            changed = True
    value = change.currency
    if value is not None:
        current = currency
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            deal.currency = Field(value, ts, eid)
            changed = True
    value = change.account
    if value is not None:
        current = account
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            deal.account = Field(value, ts, eid)
            changed = True
    value = change.expected_close_at
    if value is not None:
        current = expected
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            deal.expected_close_at = Field(value, ts, eid)
            changed = True
    value = change.deleted
    if value is not None:
        current = deleted
        if current is None or current.ts < ts or (current.ts == ts and current.event_id < eid):
            deal.deleted = Field(value, ts, eid)
            changed = True
    if change.owner is not None and _insert(deal.owners, (ts, eid, change.owner), MAX_OWNERS):
        changed = True
    if stage is not None and _insert(deal.history, (ts, eid, stage), MAX_HISTORY):
        changed = True
    if change.properties is not None and _apply_properties(deal, change, keep):
        changed = True
    recent_ids = deal.recent_ids
    recent_ids.append(eid)
    if len(recent_ids) > RECENT_IDS:
        del recent_ids[0]
    if changed:
        return _ACCEPTED
    return _IGNORED if stage_ignored else _STALE
