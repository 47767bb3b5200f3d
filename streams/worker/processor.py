"""Batch processing of ``crm.events`` and customer credits, free of Faust.

The agents hand a batch of records to these processors and carry out what comes back (table
writes, DLQ messages, re-keyed credits). Deals touched several times in a batch are decoded
once and written once, which is where most of the speed comes from.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import msgspec
import orjson

from models.aggregates import (
    ALERTED_BYTE,
    NOTHING,
    OPEN_DEAL,
    WON_REVENUE,
    Contribution,
    Fold,
    customer_contribution,
    deal_contribution,
    open_stay,
    stalled_before,
)
from models.alerts import Alert, stall_alert
from models.config import Clock, FunnelConfig
from models.deal import (
    Deal,
    Outcome,
    apply_change,
    compact,
    decode_deal,
    encode_deal,
    erase_person,
    erased_name,
)
from models.event import MIN_OCCURRED_MS, Change, RejectedEvent, decode_event
from sinks.prometheus import ProcessMetrics

MAX_CREDITED_ACCOUNTS = 4


@dataclass(slots=True)
class Record:
    """One consumed message (aiokafka's ``ConsumerRecord`` has the same fields and is used as
    it is on the events path)."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp: int | None = None  # the broker's (create or log-append) time, ms


def is_erasure(record: Record) -> bool:
    """On the ticks topic, an erasure request is a JSON object (a tick is not)."""
    return bool(record.value) and record.value.startswith(b"{")


@dataclass(slots=True)
class Rejection:
    record: Record
    code: str
    reason: str


@dataclass(slots=True)
class Credit:
    """Absolute won contribution of a deal to an account (``micro`` None = no contribution)."""

    account: str
    deal_id: str
    pipeline: str | None = None
    currency: str | None = None
    micro: int | None = None

    def encode(self) -> bytes:
        return orjson.dumps([self.deal_id, self.pipeline, self.currency, self.micro])


@dataclass(slots=True)
class DealBatch:
    writes: list[tuple[str, bytes, Record]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    credits: list[Credit] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    erased: list[tuple[str, Record]] = field(default_factory=list)  # (pseudonym, request)
    # Partitions whose folds this batch changed: undo() rebuilds them from the store, unless the
    # folds were replaced since (``folds_epoch``). (Keeping each change to take it back held
    # every contribution of the batch alive: +30 % CPU per event in garbage collection.)
    changed: set[int] = field(default_factory=set)
    folds_epoch: int = 0


class EventClock:
    """The one clock for windows, stalls and periods: wall time, or the stream clock.

    The stream clock is the latest event time that was not ahead of its record's broker
    timestamp, taken over the fleet: each worker adopts the latest clock of the published KPI
    snapshots (the KPI publisher takes the latest of every partition owner's). So one event
    dated in the future never moves it, and every worker's windows, periods and stalls agree
    (it lags a worker's own events by up to a tick or two)."""

    def __init__(self, mode: Clock) -> None:
        self.mode = mode
        self.latest_ms = 0

    def observe(self, ts_ms: int) -> None:
        if ts_ms > self.latest_ms:
            self.latest_ms = ts_ms

    def observe_stored(self, ts_ms: int) -> None:
        """An event time read back from the store (its broker time is not kept): counted only
        when not ahead of this host's wall clock."""
        if ts_ms <= time.time() * 1000:
            self.observe(ts_ms)

    def now_ms(self) -> int:
        return int(time.time() * 1000) if self.mode is Clock.WALL else self.latest_ms


@dataclass(slots=True)
class _Touched:
    deal: Deal
    before: Contribution
    record: Record
    credit_before: tuple | None = None
    write: bool = False
    resend_credit: bool = False


def _credit_of(deal: Deal, contribution: Contribution) -> tuple[str, str, str, int] | None:
    """(account, pipeline, currency, micro) of a won deal with an account, else None."""
    account = deal.value("account")
    if not account:
        return None
    for family, key, value in contribution:
        if family == WON_REVENUE:
            return account, key[0], key[1], value  # type: ignore[return-value]
    return None


class PartitionFolds:
    """Aggregates of the partitions this worker actively owns, and nothing else.

    From a revocation until the rebuild after the next assignment nothing is owned: a batch
    still in flight then updates a throw-away fold, never one that /metrics exports (the new
    owner may already export that partition)."""

    def __init__(self) -> None:
        self.folds: dict[int, Fold] = {}
        self.owned: set[int] | None = None  # None: not managed by a worker (tools, unit tests)
        self.epoch = 0  # bumped whenever the folds are replaced (rebuild, revocation)

    def fold(self, partition: int) -> Fold:
        fold = self.folds.get(partition)
        if fold is None:
            fold = Fold()
            if self.owned is None or partition in self.owned:
                self.folds[partition] = fold
        return fold

    def rebuild(self, active: set[int], items: Iterable[tuple[int, Contribution]]) -> None:
        """Recompute from the table: ``items`` are (partition, contribution) of stored values."""
        folds = {partition: Fold() for partition in active}
        for partition, contribution in items:
            fold = folds.get(partition)
            if fold is not None:
                fold.apply(contribution, 1)
        self.folds = folds
        self.owned = set(active)
        self.epoch += 1

    def rebuild_partition(self, partition: int, contributions: Iterable[Contribution]) -> None:
        """Recompute one owned partition from its stored values (after a failed batch)."""
        if self.owned is None or partition in self.owned:
            self.folds[partition] = Fold.of(contributions)

    def revoke_all(self) -> None:
        self.folds = {}
        self.owned = set()
        self.epoch += 1

    def total(self) -> Fold:
        total = Fold()
        for fold in list(self.folds.values()):
            total.merge(fold)
        return total


class DealProcessor:
    def __init__(
        self, config: FunnelConfig, clock: EventClock, metrics: ProcessMetrics,
        *, max_skew_ms: int, min_occurred_ms: int = MIN_OCCURRED_MS, ticks_topic: str = "",
        scan: Callable[[frozenset[int]], Iterable[tuple[str, bytes]]] = lambda partitions: (),
        max_stalls_per_tick: int = 200,
    ) -> None:
        self.config = config
        # Caps the work a tick does under the deals lock: after a backfill thousands of deals
        # cross their stall_after at once, and alerting them all in one go held up events for
        # seconds (bench: 8,382 alerts in 1.3 s).
        self.max_stalls_per_tick = max_stalls_per_tick
        self.scan = scan  # (deal_id, stored value) of every deal of the given partitions
        self.ticks_topic = ticks_topic
        self.clock = clock
        self.metrics = metrics
        self.max_skew_ms = max_skew_ms
        self.min_occurred_ms = min_occurred_ms
        self.folds = PartitionFolds()
        # Pseudonyms of erased owners/accounts; events naming them are masked on arrival.
        self.erased: set[str] = set()

    def contributions_of_stored(self, values: Iterable[bytes]) -> Iterator[tuple[int, Contribution]]:
        return map(self.contribution_of_stored, values)

    def contribution_of_stored(self, raw: bytes) -> tuple[int, Contribution]:
        deal = decode_deal(raw)
        self._observe_deal_time(deal)
        return deal.partition, deal_contribution(deal, self.config)

    def _observe_deal_time(self, deal: Deal) -> None:
        if deal.history:
            self.clock.observe_stored(deal.history[-1][0])

    def _reject(self, batch: DealBatch, record: Record, code: str, reason: str,
                source: str | None) -> None:
        batch.rejections.append(Rejection(record, code, reason))
        self.metrics.rejected(self._source_label(source), code)

    def _source_label(self, source: str | None) -> str:
        if source is None:
            return "unknown"
        return source if source in self.config.sources else "other"

    def process(self, records: list[Record], load: Callable[[str, Record], bytes | None],
                lagging: frozenset[int] = frozenset()) -> DealBatch:
        """``lagging``: partitions still catching up a backlog; their stall checks wait (a
        replay's stream clock runs ahead of deals whose later events are still queued).

        All or nothing in memory: when it raises, the folds are as before the batch (the store
        still holds the old versions, so a retry must not find this batch's changes in them)."""
        batch = DealBatch(folds_epoch=self.folds.epoch)
        try:
            self._process(batch, records, load, lagging)
        except BaseException:
            self.undo(batch)
            raise
        return batch

    def undo(self, batch: DealBatch) -> None:
        """Take a batch's fold updates back: its writes did not reach the store, which still
        holds every deal as before the batch, so the partitions it changed are rebuilt from it.
        Folds rebuilt since (a revoke and a new assignment while the batch was held) never had
        them."""
        if batch.folds_epoch != self.folds.epoch:
            return
        stored: dict[int, list[Contribution]] = {partition: [] for partition in batch.changed}
        for _, raw in self.scan(frozenset(batch.changed)):  # one pass over the store
            partition, contribution = self.contribution_of_stored(raw)
            if partition in stored:
                stored[partition].append(contribution)
        for partition, contributions in stored.items():
            self.folds.rebuild_partition(partition, contributions)
        batch.changed.clear()

    def _replace(self, batch: DealBatch, partition: int, before: Contribution,
                 after: Contribution) -> None:
        self.folds.fold(partition).replace(before, after)
        batch.changed.add(partition)

    def _process(self, batch: DealBatch, records: list[Record],
                 load: Callable[[str, Record], bytes | None], lagging: frozenset[int]) -> None:
        touched: dict[str, _Touched] = {}
        ticks: dict[int, Record] = {}
        erasures: list[Record] = []
        outcomes: dict[tuple[str, Outcome], int] = {}
        lags: dict[str, list[int]] = {}
        latest_ms = 0  # the stream clock moves once per batch, before anything reads it
        wall_ms = int(time.time() * 1000)
        pipelines = self.config.pipelines
        for record in records:
            if record.topic == self.ticks_topic:
                if is_erasure(record):
                    erasures.append(record)
                else:
                    ticks[record.partition] = record
                continue
            try:
                change = decode_event(record.value, now_ms=wall_ms, max_skew_ms=self.max_skew_ms,
                                      min_ms=self.min_occurred_ms)
            except RejectedEvent as exc:
                self._reject(batch, record, exc.code, exc.reason, None)
                continue
            if self.erased:
                change = self._masked(change)
            state = touched.get(change.deal_id)
            if state is None:
                raw = load(change.deal_id, record)
                deal = decode_deal(raw) if raw is not None else Deal(change.deal_id, record.partition)
                before = deal_contribution(deal, self.config) if raw is not None else NOTHING
                state = touched[change.deal_id] = _Touched(
                    deal, before, record, _credit_of(deal, before)
                )
            deal = state.deal
            pipeline = change.pipeline or deal.value("pipeline") or "default"
            if pipeline not in pipelines:
                self._reject(batch, record, "unknown_pipeline",
                             f"pipeline {pipeline!r} is not configured", change.source)
                continue
            stage = None
            if change.stage is not None:
                try:
                    stage = self.config.map_stage(change.source, pipeline, change.stage)  # type: ignore[arg-type]
                except KeyError as exc:
                    self._reject(batch, record, "unmapped_stage", exc.args[0], change.source)
                    continue
            outcome = apply_change(
                deal, change, stage, stage_ignored=change.stage is not None and stage is None
            )
            ts = change.ts
            if ts > latest_ms and (record.timestamp is None or ts <= record.timestamp):
                latest_ms = ts  # an event dated ahead of the broker's time never moves the clock
            source = self._source_label(change.source)
            outcomes[source, outcome] = outcomes.get((source, outcome), 0) + 1
            if outcome is Outcome.ACCEPTED:
                source_lags = lags.get(source)
                if source_lags is None:
                    source_lags = lags[source] = []
                source_lags.append(wall_ms - ts)
            state.record = record
            # A duplicate usually means a redelivery after a crash: re-write the deal and its
            # credit as they are, which heals a changelog or credit that missed the first write.
            state.resend_credit |= outcome is Outcome.DUPLICATE
            state.write = True
        # From here on ``touched`` holds the latest version of every deal this batch changed:
        # ticks and erasures read it and add to it, or a later one would start from the
        # stored version and write over an earlier one's change (and its fold update).
        self.clock.observe(latest_ms)
        for deal_id, state in touched.items():
            self._finish(batch, deal_id, state)
        for partition, record in ticks.items():
            if partition not in lagging:
                self._raise_stalls(batch, partition, record, touched, load)
        for record in erasures:
            self._erase(batch, record, touched)
        self.metrics.counted(outcomes, lags)  # once per batch that went through, not per try

    def _masked(self, change: Change) -> Change:
        owner, account = change.owner, change.account
        if owner is not None and erased_name(owner) in self.erased:
            owner = erased_name(owner)
        if account is not None and erased_name(account) in self.erased:
            account = erased_name(account)
        if owner is change.owner and account is change.account:
            return change
        return msgspec.structs.replace(change, owner=owner, account=account)

    def _erase(self, batch: DealBatch, record: Record, touched: dict[str, _Touched]) -> None:
        """An erasure request for one partition: pseudonymise the person in every deal of it
        (KPIs keep their totals; the name is gone) and in every later event."""
        name = orjson.loads(record.value)["erase"]  # type: ignore[arg-type]
        self.erased.add(erased_name(name))
        batch.erased.append((erased_name(name), record))
        for deal_id, raw in self.scan(frozenset({record.partition})):
            state = touched.get(deal_id)
            deal = state.deal if state else decode_deal(raw)
            before = deal_contribution(deal, self.config)
            credit_before = _credit_of(deal, before)
            if not erase_person(deal, name):
                continue
            erased = touched[deal_id] = _Touched(deal, before, record, credit_before, write=True)
            self._finish(batch, deal_id, erased)

    def _raise_stalls(self, batch: DealBatch, partition: int, record: Record,
                      touched: dict[str, _Touched],
                      load: Callable[[str, Record], bytes | None]) -> None:
        """A tick: raise one ``deal.stalled`` per deal that crossed its stage's stall_after,
        the longest stalled first and at most ``max_stalls_per_tick``; the rest stay crossed
        and are raised by the next ticks.

        The alert is remembered in the deal (``stall_alert``), so a restart, a rebalance or a
        re-sent tick never raises it twice for the same stay.
        """
        fold = self.folds.folds.get(partition)
        if fold is None:
            return
        now = self.clock.now_ms()
        crossed = []
        for (pl, stage, _), group in fold.open_deals.items():
            stall_after = self.config.pipelines[pl].by_name[stage].stall_after
            if stall_after is None:
                continue
            before = stalled_before(now, stall_after)
            for deal_id, packed in group.items():
                if packed[ALERTED_BYTE]:  # raised already (most stalled deals): skip unpacking
                    continue
                entered = OPEN_DEAL.unpack(packed)[0]
                if entered < before:
                    crossed.append((entered, deal_id, pl, stage, stall_after))
        if len(crossed) > self.max_stalls_per_tick:
            crossed = heapq.nsmallest(self.max_stalls_per_tick, crossed)
        for entered, deal_id, pl, stage, stall_after in crossed:
            state = touched.get(deal_id)
            deal = state.deal if state else decode_deal(load(deal_id, record))  # type: ignore[arg-type]
            before = deal_contribution(deal, self.config)
            deal.stall_alert = [stage, entered]
            after = deal_contribution(deal, self.config)
            self._replace(batch, partition, before, after)
            touched[deal_id] = _Touched(deal, after, record)
            batch.writes.append((deal_id, encode_deal(deal), record))
            batch.alerts.append(self._stall_alert("deal.stalled", deal, pl, stage, entered, now,
                                                  stall_after))

    def _stall_alert(self, kind, deal: Deal, pl: str, stage: str, entered: int, now: int,
                     stall_after: float | None) -> Alert:
        return stall_alert(
            kind, deal_id=deal.deal_id, pipeline=pl, stage=stage, entered_ms=entered, now_ms=now,
            stall_after=stall_after, amount=deal.value("amount"),  # type: ignore[arg-type]
            currency=deal.value("currency") or self.config.default_currency,  # type: ignore[arg-type]
            owner=deal.owner,
        )

    def _finish(self, batch: DealBatch, deal_id: str, state: _Touched) -> None:
        deal = state.deal
        if state.write and deal.stall_alert is not None and open_stay(deal, self.config) != deal.stall_alert:
            stage, entered = deal.stall_alert
            pl = deal.value("pipeline") or "default"
            batch.alerts.append(self._stall_alert(
                "deal.unstalled", deal, pl, stage, entered, self.clock.now_ms(),  # type: ignore[arg-type]
                self.config.pipelines[pl].by_name[stage].stall_after
                if stage in self.config.pipelines[pl].by_name else None,  # type: ignore[index]
            ))
            deal.stall_alert = None
        after = deal_contribution(deal, self.config)
        partition = state.record.partition
        if state.write:
            self._replace(batch, partition, state.before, after)
        credit = _credit_of(deal, after)
        if credit != state.credit_before or state.resend_credit:
            account = credit[0] if credit else None
            for old in deal.credited_accounts:
                if old != account:
                    batch.credits.append(Credit(old, deal_id))
            if credit:
                batch.credits.append(Credit(credit[0], deal_id, credit[1], credit[2], credit[3]))
                if account not in deal.credited_accounts:
                    deal.credited_accounts.append(account)
                    del deal.credited_accounts[:-MAX_CREDITED_ACCOUNTS]
                    state.write = True
        if state.write:
            deal.partition = partition
            batch.writes.append((deal_id, encode_deal(deal), state.record))


class LegacyCustomerRow(ValueError):
    """A customers row of the format before issue 18 (one row per account)."""


def customer_key(account: str, deal_id: str) -> str:
    return f"{account}\x00{deal_id}"


class CustomerProcessor:
    """The ``customers`` table: one row per credited (account, deal), the deal's absolute won
    contribution, so a row stays small however many deals an account wins (one row per
    account held every deal and outgrew a producer request at ~15,000). Re-sent credits
    overwrite their row (idempotent); a credit taken back deletes it. The folds count per
    account, from per-account totals kept in memory and rebuilt with the folds."""

    def __init__(self) -> None:
        self.folds = PartitionFolds()
        # account → (pipeline, currency) → [credited deals, won micro units]
        self.totals: dict[str, dict[tuple[str, str], list[int]]] = {}

    def contributions_of_stored(self, values: Iterable[bytes]) -> Iterator[tuple[int, Contribution]]:
        """Every stored account's contribution (recomputes the per-account totals)."""
        totals: dict[str, dict[tuple[str, str], list[int]]] = {}
        partitions: dict[str, int] = {}
        for raw in values:
            row = orjson.loads(raw)
            if len(row) != 5:
                raise LegacyCustomerRow(
                    "the customers table holds rows of the format before issue 18 (one row per "
                    "account): rebuild under a new FUNNEL_APP_ID (docs/operations.md, "
                    "\"Upgrading from a version before issue 18\")")
            partition, account, pipeline, currency, micro = row
            partitions[account] = partition
            _add_credit(totals.setdefault(account, {}), pipeline, currency, micro, 1)
        self.totals = totals
        for account, by_key in totals.items():
            yield partitions[account], customer_contribution(account, _micro(by_key))

    def process(
        self, records: list[Record], load: Callable[[str, Record], bytes | None]
    ) -> list[tuple[str, bytes | None, Record]]:
        """(key, row or None to delete it, credit record) to write."""
        before: dict[str, tuple[Contribution, Record]] = {}
        rows: dict[str, tuple[bytes | None, Record]] = {}
        for record in records:
            if record.key is None or record.value is None:
                continue
            account = record.key.decode()
            deal_id, pipeline, currency, micro = orjson.loads(record.value)
            totals = self.totals.setdefault(account, {})
            if account not in before:
                before[account] = (customer_contribution(account, _micro(totals)), record)
            key = customer_key(account, deal_id)
            old = rows[key][0] if key in rows else load(key, record)
            if old is not None:
                _add_credit(totals, *orjson.loads(old)[2:], -1)
            row = None
            if micro is not None:
                _add_credit(totals, pipeline, currency, micro, 1)
                row = compact(orjson.dumps([record.partition, account, pipeline, currency, micro]))
            rows[key] = (row, record)
        for account, (contribution, record) in before.items():
            after = customer_contribution(account, _micro(self.totals[account]))
            self.folds.fold(record.partition).replace(contribution, after)
            if not self.totals[account]:
                del self.totals[account]
        return [(key, row, record) for key, (row, record) in rows.items()]


def _add_credit(totals: dict[tuple[str, str], list[int]], pipeline: str, currency: str,
                micro: int, sign: int) -> None:
    entry = totals.setdefault((pipeline, currency), [0, 0])
    entry[0] += sign
    entry[1] += sign * micro
    if not entry[0]:
        del totals[(pipeline, currency)]


def _micro(totals: dict[tuple[str, str], list[int]]) -> dict[tuple[str, str], int]:
    return {key: micro for key, (_, micro) in totals.items()}
