"""Batches of ``crm.events`` records, stall checks and erasures, applied to the deals.

The worker hands a batch to :meth:`DealProcessor.process` and carries out what comes back
(table writes, alerts, DLQ messages, credits re-keyed by account, counts for the metrics).
Deals touched several times in a batch are decoded once and written once, which is where most
of the speed comes from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import msgspec
import orjson
from aiokafka.partitioner import murmur2

from models.aggregates import NOTHING, WON_REVENUE, Contribution, deal_contribution, open_stay
from models.alerts import Alert, stall_alert
from models.config import FunnelConfig
from models.deal import Deal, Outcome, apply_change, decode_deal, encode_deal
from models.event import MIN_OCCURRED_MS, Change, RejectedEvent, decode_event
from processors.clock import EventClock
from processors.erasure import pseudonym_of, pseudonymise
from processors.folds import PartitionFolds
from processors.records import Record, Rejection
from processors.stalls import crossed_stalls

MAX_CREDITED_ACCOUNTS = 4
Load = Callable[[str], bytes | None]
# Enum members read once: on Python 3.11 each ``Outcome.X`` goes through the enum metaclass.
_ACCEPTED, _DUPLICATE = Outcome.ACCEPTED, Outcome.DUPLICATE


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2) gives a key."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


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
    """What one batch does: the worker produces it, then exports the counts."""

    writes: list[tuple[str, bytes, int]] = field(default_factory=list)  # (deal id, value, partition)
    rejections: list[Rejection] = field(default_factory=list)
    credits: list[Credit] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    outcomes: dict[tuple[str, Outcome], int] = field(default_factory=dict)  # (source, outcome)
    lags: dict[str, list[int]] = field(default_factory=dict)  # accepted events' lag, ms, by source
    # Partitions whose folds this batch changed: undo() rebuilds them from the store. (Keeping
    # each change to take it back held every contribution of the batch alive: +30 % CPU per
    # event in garbage collection.)
    changed: set[int] = field(default_factory=set)


@dataclass(slots=True)
class _Touched:
    deal: Deal
    before: Contribution
    partition: int
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


class DealProcessor:
    def __init__(
        self, config: FunnelConfig, clock: EventClock, *, max_skew_ms: int,
        min_occurred_ms: int = MIN_OCCURRED_MS, partitions: int | None = None,
        scan: Callable[[frozenset[int] | None], Iterable[tuple[str, bytes]]] = lambda partitions: (),
        max_stalls_per_check: int = 200,
    ) -> None:
        self.config = config
        # Caps the work one stall check does: after a backfill thousands of deals cross their
        # stall_after at once, and alerting them all in one go held up events for seconds
        # (bench: 8,382 alerts in 1.3 s).
        self.max_stalls_per_check = max_stalls_per_check
        self.scan = scan  # (deal_id, stored value) of every deal of the given partitions (None: all)
        self.partitions = partitions  # of crm.events; None: not checked (tools, unit tests)
        self.clock = clock
        self.max_skew_ms = max_skew_ms
        self.min_occurred_ms = min_occurred_ms
        self.folds = PartitionFolds()
        # Pseudonyms of erased owners/accounts; events naming them are masked on arrival.
        self.erased: set[str] = set()

    def contributions_of_stored(self, values: Iterable[bytes]) -> Iterator[tuple[int, Contribution]]:
        return map(self.contribution_of_stored, values)

    def contribution_of_stored(self, raw: bytes) -> tuple[int, Contribution]:
        deal = decode_deal(raw)
        if deal.history:
            self.clock.observe_stored(deal.history[-1][0])
        return deal.partition, deal_contribution(deal, self.config)

    def source_label(self, source: str | None) -> str:
        if source is None:
            return "unknown"
        return source if source in self.config.sources else "other"

    def process(self, records: list[Record], load: Load, stall_checks: Iterable[int] = (),
                erasures: Iterable[str] = ()) -> DealBatch:
        """``records`` from ``crm.events``; then ``stall_checks``: the partitions whose stalled
        deals to look for (a timed step of the worker); then ``erasures``: pseudonyms of people
        to erase from every owned deal and every later event.

        All or nothing in memory: when it raises, the folds are as before the batch (the store
        still holds the old versions, so a retry must not find this batch's changes in them)."""
        batch = DealBatch()
        try:
            self._process(batch, records, load, stall_checks, set(erasures))
        except BaseException:
            self.undo(batch)
            raise
        return batch

    def undo(self, batch: DealBatch) -> None:
        """Take a batch's fold updates back: its writes did not reach the store, which still
        holds every deal as before the batch, so the partitions it changed are rebuilt from it."""
        if not batch.changed:
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

    def _misplaced(self, record: Record, deal_id: str, stored: Deal | None) -> str | None:
        """Why an event cannot be applied on its record's partition, if it cannot: every event
        of a deal must reach the partition that holds the deal, or the deal splits in two."""
        if stored is not None:
            if stored.partition in (record.partition, -1):
                return None
            return (f"deal {deal_id!r} is held on partition {stored.partition}, this event came "
                    f"on {record.partition} (key {record.key!r})")
        if self.partitions is None or record.key == deal_id.encode():
            return None  # keyed by its deal id: every event of the deal shares a partition
        expected = kafka_partition(deal_id.encode(), self.partitions)
        if expected == record.partition:
            return None
        return (f"deal {deal_id!r} belongs on partition {expected}, this event came on "
                f"{record.partition} (key {record.key!r})")

    def _reject(self, batch: DealBatch, record: Record, code: str, reason: str,
                source: str | None) -> None:
        batch.rejections.append(Rejection(record, code, reason, self.source_label(source)))

    def _process(self, batch: DealBatch, records: list[Record], load: Load,
                 stall_checks: Iterable[int], erasures: set[str]) -> None:
        touched: dict[str, _Touched] = {}
        outcomes = batch.outcomes
        lags = batch.lags
        labels: dict[str | None, str] = {}
        latest_ms = 0  # the stream clock moves once per batch, before anything reads it
        wall_ms = int(time.time() * 1000)
        pipelines = self.config.pipelines
        for record in records:
            try:
                change = decode_event(record.value, now_ms=wall_ms, max_skew_ms=self.max_skew_ms,
                                      min_ms=self.min_occurred_ms)
            except RejectedEvent as exc:
                self._reject(batch, record, exc.code, exc.reason, None)
                continue
            if self.erased:
                change = self._masked(change)
            state = touched.get(change.deal_id)
            if state is None or state.partition != record.partition:
                raw = load(change.deal_id) if state is None else None
                deal = decode_deal(raw) if raw is not None else None
                misplaced = self._misplaced(record, change.deal_id,
                                            state.deal if state is not None else deal)
                if misplaced is not None:
                    self._reject(batch, record, "wrong_partition", misplaced + ": produce every "
                                 "event with key = deal_id and Kafka's default partitioner",
                                 change.source)
                    continue
                if deal is None:
                    deal = Deal(change.deal_id, record.partition)
                before = deal_contribution(deal, self.config) if raw is not None else NOTHING
                state = touched[change.deal_id] = _Touched(
                    deal, before, record.partition, _credit_of(deal, before)
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
            source = labels.get(change.source)
            if source is None:
                source = labels[change.source] = self.source_label(change.source)
            outcomes[source, outcome] = outcomes.get((source, outcome), 0) + 1
            if outcome is _ACCEPTED:
                source_lags = lags.get(source)
                if source_lags is None:
                    source_lags = lags[source] = []
                source_lags.append(wall_ms - ts)
            # A duplicate usually means a redelivery after a crash: re-write the deal and its
            # credit as they are, which heals a changelog or credit that missed the first write.
            state.resend_credit |= outcome is _DUPLICATE
            state.write = True
        # From here on ``touched`` holds the latest version of every deal this batch changed:
        # stall checks and erasures read it and add to it, or a later one would start from the
        # stored version and write over an earlier one's change (and its fold update).
        self.clock.observe(latest_ms)
        for deal_id, state in touched.items():
            self._finish(batch, deal_id, state)
        for partition in stall_checks:
            self._raise_stalls(batch, partition, touched, load)
        if erasures:
            self._erase(batch, erasures, touched)

    def _masked(self, change: Change) -> Change:
        owner, account = change.owner, change.account
        if owner is not None and pseudonym_of(owner) in self.erased:
            owner = pseudonym_of(owner)
        if account is not None and pseudonym_of(account) in self.erased:
            account = pseudonym_of(account)
        if owner is change.owner and account is change.account:
            return change
        return msgspec.structs.replace(change, owner=owner, account=account)

    def _erase(self, batch: DealBatch, erasures: set[str], touched: dict[str, _Touched]) -> None:
        """Pseudonymise the people in every owned deal (KPIs keep their totals; the names are
        gone) and in every later event. Idempotent: a deal already pseudonymised is left alone."""
        self.erased |= erasures
        for deal_id, raw in self.scan(None if self.folds.owned is None else frozenset(self.folds.owned)):
            state = touched.get(deal_id)
            deal = state.deal if state else decode_deal(raw)
            before = deal_contribution(deal, self.config)
            credit_before = _credit_of(deal, before)
            replaced = pseudonymise(deal, erasures)
            if replaced is None:
                continue
            batch.credits.extend(Credit(account, deal_id) for account in replaced)
            erased = touched[deal_id] = _Touched(deal, before, deal.partition, credit_before,
                                                 write=True)
            self._finish(batch, deal_id, erased)

    def _raise_stalls(self, batch: DealBatch, partition: int, touched: dict[str, _Touched],
                      load: Load) -> None:
        """Raise one ``deal.stalled`` per deal of the partition that crossed its stage's
        stall_after, the longest stalled first and at most ``max_stalls_per_check``; the rest
        stay crossed and are raised by the next checks.

        The alert is remembered in the deal (``stall_alert``), so a restart, a rebalance or a
        repeated check never raises it twice for the same stay.
        """
        fold = self.folds.folds.get(partition)
        if fold is None:
            return
        now = self.clock.now_ms()
        for entered, deal_id, pl, stage, stall_after in crossed_stalls(
                fold, self.config, now, self.max_stalls_per_check):
            state = touched.get(deal_id)
            deal = state.deal if state else decode_deal(load(deal_id))  # type: ignore[arg-type]
            before = deal_contribution(deal, self.config)
            deal.stall_alert = [stage, entered]
            after = deal_contribution(deal, self.config)
            self._replace(batch, partition, before, after)
            touched[deal_id] = _Touched(deal, after, partition)
            batch.writes.append((deal_id, encode_deal(deal), partition))
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
        partition = state.partition
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
            batch.writes.append((deal_id, encode_deal(deal), partition))
