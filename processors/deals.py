"""Batches of ``crm.events`` records, stall checks and erasures, applied to the deals.

The worker hands a batch to :meth:`DealProcessor.process` and carries out what comes back
(table writes, alerts, DLQ messages, credits re-keyed by account, counts for the metrics).
Deals touched several times in a batch are decoded once and written once: most of the speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from models.aggregates import NOTHING, Contribution, deal_contribution
from models.alerts import Alert
from models.config import FunnelConfig
from models.deal import Deal, Outcome, apply_change
from models.deal_codec import decode_deal, encode_deal
from models.event import MIN_OCCURRED_MS, RejectedEvent, decode_event
from processors.clock import EventClock
from processors.credits import Credit, CreditOf, credit_of, recredit
from processors.erasure import masked, pseudonymise
from processors.folds import PartitionFolds
from processors.records import Record, Rejection, kafka_partition
from processors.stalls import crossed_stalls, deal_stall_alert, unstall

Load = Callable[[str], bytes | None]
Scan = Callable[[frozenset[int] | None], Iterable[tuple[str, bytes]]]
# Enum members read once: on Python 3.11 each ``Outcome.X`` goes through the enum metaclass.
_ACCEPTED, _DUPLICATE = Outcome.ACCEPTED, Outcome.DUPLICATE


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
    """A deal as this batch left it, and what it contributed before."""

    deal: Deal
    before: Contribution
    partition: int
    credit_before: CreditOf | None = None
    write: bool = False
    resend_credit: bool = False


class DealProcessor:
    """The deals of the owned partitions: their folds, the stream clock, the erased people."""

    def __init__(self, config: FunnelConfig, clock: EventClock, *, max_skew_ms: int,
                 min_occurred_ms: int = MIN_OCCURRED_MS, partitions: int | None = None,
                 scan: Scan = lambda partitions: (), max_stalls_per_check: int = 200) -> None:
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
        """``erasures`` first: pseudonyms of people to erase from every stored deal and from
        every event from here on (this batch's included); then ``records`` from ``crm.events``;
        then ``stall_checks``: the partitions whose stalled deals to look for (a timed step).

        All or nothing in memory: when it raises, the folds are as before the batch (the store
        still holds the old versions, so a retry must not find this batch's changes in them)."""
        work = _BatchWork(self, load)
        try:
            erasures = set(erasures)
            if erasures:  # first: then this batch's events are masked on arrival too
                self.erased |= erasures
                work.erase(erasures)
            work.apply(records)
            # From here on the work's ``touched`` holds the latest version of every deal this
            # batch changed: stall checks read it and add to it, or a later one would start
            # from the stored version and overwrite an earlier one's change.
            for partition in stall_checks:
                work.raise_stalls(partition)
        except BaseException:
            self.undo(work.batch)
            raise
        return work.batch

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

    def misplaced(self, record: Record, deal_id: str, stored: Deal | None) -> str | None:
        """Why an event cannot be applied on its record's partition, if it cannot: every event
        of a deal must reach the partition that holds the deal, or the deal splits in two."""
        if stored is not None:
            if stored.partition in (record.partition, -1):  # -1: stored before partitions were
                return None
            where = f"is held on partition {stored.partition}"
        elif self.partitions is None or record.key == deal_id.encode():
            return None  # keyed by its deal id: every event of the deal shares a partition
        else:
            expected = kafka_partition(deal_id.encode(), self.partitions)
            if expected == record.partition:
                return None
            where = f"belongs on partition {expected}"
        return (f"deal {deal_id!r} {where}, this event came on {record.partition} (key "
                f"{record.key!r}): produce every event with key = deal_id and Kafka's default "
                "partitioner")


class _BatchWork:
    """One batch in the making: the deals it touched, and what it does."""

    def __init__(self, processor: DealProcessor, load: Load) -> None:
        self.processor = processor
        self.config = processor.config
        self.load = load
        self.batch = DealBatch()
        self.touched: dict[str, _Touched] = {}

    def reject(self, record: Record, code: str, reason: str, source: str | None) -> None:
        self.batch.rejections.append(
            Rejection(record, code, reason, self.processor.source_label(source)))

    def apply(self, records: list[Record]) -> None:
        processor, touched = self.processor, self.touched
        outcomes, lags = self.batch.outcomes, self.batch.lags
        labels: dict[str | None, str] = {}
        latest_ms = 0  # the stream clock moves once per batch, before anything reads it
        wall_ms = int(time.time() * 1000)
        pipelines = self.config.pipelines
        kept = self.config.kept_properties
        for record in records:
            try:
                change = decode_event(record.value, now_ms=wall_ms, max_skew_ms=processor.max_skew_ms,
                                      min_ms=processor.min_occurred_ms)
            except RejectedEvent as exc:
                self.reject(record, exc.code, exc.reason, None)
                continue
            if processor.erased:
                change = masked(change, processor.erased)
            state = touched.get(change.deal_id)
            if state is None or state.partition != record.partition:
                raw = self.load(change.deal_id) if state is None else None
                deal = decode_deal(raw) if raw is not None else None
                misplaced = processor.misplaced(record, change.deal_id,
                                                state.deal if state is not None else deal)
                if misplaced is not None:
                    self.reject(record, "wrong_partition", misplaced, change.source)
                    continue
                if deal is None:
                    deal = Deal(change.deal_id, record.partition)
                before = deal_contribution(deal, self.config) if raw is not None else NOTHING
                state = touched[change.deal_id] = _Touched(
                    deal, before, record.partition, credit_of(deal, before))
            deal = state.deal
            pipeline = change.pipeline or deal.value("pipeline") or "default"
            if pipeline not in pipelines:
                self.reject(record, "unknown_pipeline", f"pipeline {pipeline!r} is not configured",
                            change.source)
                continue
            stage = None
            if change.stage is not None:
                try:
                    stage = self.config.map_stage(change.source, pipeline, change.stage)  # type: ignore[arg-type]
                except KeyError as exc:
                    self.reject(record, "unmapped_stage", exc.args[0], change.source)
                    continue
            outcome = apply_change(
                deal, change, stage, stage_ignored=change.stage is not None and stage is None,
                keep=kept,
            )
            ts = change.ts
            if ts > latest_ms and (record.timestamp is None or ts <= record.timestamp):
                latest_ms = ts  # an event dated ahead of the broker's time never moves the clock
            source = labels.get(change.source)
            if source is None:
                source = labels[change.source] = processor.source_label(change.source)
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
        processor.clock.observe(latest_ms)
        for deal_id, state in touched.items():
            self.finish(deal_id, state)

    def replace(self, partition: int, before: Contribution, after: Contribution) -> None:
        self.processor.folds.fold(partition).replace(before, after)
        self.batch.changed.add(partition)

    def raise_stalls(self, partition: int) -> None:
        """Raise one ``deal.stalled`` per deal of the partition that crossed its stage's
        stall_after, the longest stalled first and at most ``max_stalls_per_check``; the rest
        stay crossed and are raised by the next checks.

        The alert is remembered in the deal (``stall_alert``), so a restart, a rebalance or a
        repeated check never raises it twice for the same stay.
        """
        processor = self.processor
        fold = processor.folds.folds.get(partition)
        if fold is None:
            return
        now = processor.clock.now_ms()
        for entered, deal_id, _, stage, _ in crossed_stalls(fold, self.config, now,
                                                              processor.max_stalls_per_check):
            state = self.touched.get(deal_id)
            deal = state.deal if state else decode_deal(self.load(deal_id))  # type: ignore[arg-type]
            before = deal_contribution(deal, self.config)
            deal.stall_alert = [stage, entered]
            after = deal_contribution(deal, self.config)
            self.replace(partition, before, after)
            self.touched[deal_id] = _Touched(deal, after, partition)
            self.batch.writes.append((deal_id, encode_deal(deal), partition))
            self.batch.alerts.append(deal_stall_alert("deal.stalled", deal, self.config, stage,
                                                      entered, now))

    def erase(self, erasures: set[str]) -> None:
        """Pseudonymise the people in every stored deal of the owned partitions (KPIs keep their
        totals; the names are gone), before the batch's events: :meth:`apply` finishes them.
        Idempotent: a deal already pseudonymised is left alone."""
        owned = self.processor.folds.owned
        for deal_id, raw in self.processor.scan(None if owned is None else frozenset(owned)):
            deal = decode_deal(raw)
            before = deal_contribution(deal, self.config)
            credit_before = credit_of(deal, before)
            replaced = pseudonymise(deal, erasures)
            if replaced is None:
                continue
            self.batch.credits.extend(Credit(account, deal_id) for account in replaced)
            self.touched[deal_id] = _Touched(deal, before, deal.partition, credit_before, write=True)

    def finish(self, deal_id: str, state: _Touched) -> None:
        """Fold the deal's change, move its credit, queue its write."""
        deal, batch = state.deal, self.batch
        if state.write and deal.stall_alert is not None:
            alert = unstall(deal, self.config, self.processor.clock.now_ms())
            if alert is not None:
                batch.alerts.append(alert)
        after = deal_contribution(deal, self.config)
        if state.write:
            self.replace(state.partition, state.before, after)
        credit = credit_of(deal, after)
        if credit != state.credit_before or state.resend_credit:
            credits, grew = recredit(deal, credit)
            batch.credits.extend(credits)
            state.write |= grew
        if state.write:
            deal.partition = state.partition
            batch.writes.append((deal_id, encode_deal(deal), state.partition))
