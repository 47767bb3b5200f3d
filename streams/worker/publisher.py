"""Cross-partition KPIs: snapshots on ``funnel.kpis`` and conversion-drop alerts.

Each worker publishes, every tick, a *partial* per partition it owns: the business samples of
that partition's fold (what ``/metrics`` would show for it alone). Partials go to a topic with
one partition, so exactly one worker — its owner — combines them: it sums the latest partial of
every partition, and only once it has them all (never a half-computed snapshot), builds one
snapshot per pipeline with the functions of :mod:`models.kpis`, and checks conversion drops.
Deals partials also carry their partition's candidates for the dimensions' kept values: the
owner decides the fleet's kept values from them and publishes them in the snapshots
(:mod:`models.fleet_values`).
A new owner claims the next persisted ``generation``, so ``(generation, sequence)`` only
increases; a fleet's first claim (a new app id, or its state deleted) is the wall clock in ms,
above every older fleet's however often that one's publisher moved since. Partials carry the
consumer-group generation they were sent in, and a new owner uses only those sent since it took
over: the backlog it re-reads holds partials of owners since gone, some from the middle of a
replay (F8).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import orjson
from prometheus_client.registry import Collector

from models import aggregates as agg
from models.alerts import Alert, alert_id, iso
from models.config import FunnelConfig
from models.fleet_values import Candidates, KeptValues, candidates, fleet_kept
from models.fold import Fold
from models.kpis import ConversionCheck, Samples, conversion_checks, total
from models.snapshot import KpiSnapshot, build_snapshot
from processors.records import Record
from sinks.config_gauges import CONFIG_METRICS
from sinks.prometheus import KpiCollector

TOP_CUSTOMERS = 100
REPUBLISH_SECONDS = 30.0  # an unchanged snapshot is still re-sent this often (liveness)
GENERATION_KEY = "generation"
# When the fleet first claimed a generation (ms): in conversion-drop alert ids, so a fleet rebuilt
# with empty tables never reuses an older fleet's.
FLEET_KEY = "fleet"
# Conversion is only judged once every partition is this close to its end: while a backlog
# drains, partitions stand at different points in time and their sum is no real conversion.
MAX_CHECK_LAG = 1000


def collect_samples(collector: Collector) -> Samples:
    samples: Samples = {}
    for family in collector.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def encode_partial(kind: str, partition: int, now_ms: int, config: FunnelConfig,
                   fold: Fold, lag: int = 0, generation: int = 0, kept: KeptValues | None = None) -> bytes:
    """A partition's business samples (config gauges are the publisher's own; per dimension the
    values ``kept``, as on /metrics), top customers and candidates for the kept values, stamped
    with the consumer-group generation in which the sender owned the partition."""
    collector = KpiCollector(config, lambda: [fold], lambda: now_ms, "partial", kept=kept)
    rows = [
        [name, labels, value]
        for name, values in collect_samples(collector).items() if name not in CONFIG_METRICS
        for labels, value in values if value
    ]
    top = sorted(fold.accounts.items(), key=lambda kv: -kv[1])[:TOP_CUSTOMERS]
    return orjson.dumps([kind, partition, now_ms, rows, [[*key, micro] for key, micro in top], lag,
                         generation, candidates(config, fold.counters.get(agg.DIMENSION, {}))])


def owned_partials(config: FunnelConfig, now_ms: int, generation: int, lag: Callable[[int], int],
                   kept: KeptValues | None = None, **folds: dict[int, Fold]) -> Iterator[tuple[bytes, bytes]]:
    """(key, partial) of each partition of each kind of fold a worker owns; ``lag``: of a deals
    partition (the publisher judges conversion only once every partition caught up)."""
    for kind, by_partition in folds.items():
        for partition, fold in list(by_partition.items()):
            yield f"{kind}:{partition}".encode(), encode_partial(
                kind, partition, now_ms, config, fold, lag(partition) if kind == "deals" else 0,
                generation, kept)


class Partial(NamedTuple):
    """A partition's latest partial, as the publisher keeps it."""

    order: tuple[int, int]  # (consumer-group generation it was sent in, as_of)
    rows: list
    top: list               # top customers
    lag: int
    candidates: Candidates | None  # None: sent by a version before candidates


def top_customers(partials: Iterable[Partial], pipeline: str, currency: str) -> list[tuple[str, float]]:
    """The pipeline's largest lifetime values in ``currency`` over every partition's partial."""
    values: dict[str, float] = {}
    for partial in partials:
        for pl, in_currency, account, micro in partial.top:
            if pl == pipeline and in_currency == currency:
                values[account] = values.get(account, 0) + micro / agg.MICRO
    return sorted(values.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_CUSTOMERS]


@dataclass
class Published:
    """A batch's outputs, in the order they must become durable: ``claim`` (a new generation)
    before anything else, so a generation never goes out unless stored; ``alerts`` before the
    ``writes`` that remember them, so an alert is never remembered unless sent."""

    claim: list[tuple[str, bytes]]
    alerts: list[Alert]
    writes: list[tuple[str, bytes]]
    snapshots: list[KpiSnapshot]


class KpiPublisher:
    def __init__(self, config: FunnelConfig, partitions: int, version: str) -> None:
        self.config = config
        self.partitions = partitions
        self.version = version
        self.partials: dict[tuple[str, int], Partial] = {}  # by (kind, partition)
        self.generation: int | None = None
        self.fleet = 0  # FLEET_KEY, read with each claim
        self.sequence = 0
        self.since_group_generation = 0  # partials sent in older group generations are ignored
        self.last: dict[str, tuple[dict, float, KpiSnapshot]] = {}
        self.order = {
            name: [stage.name for stage in pipeline.open_stages]
            for name, pipeline in config.pipelines.items()
        }

    def revoked(self) -> None:
        """Another worker may publish now; if we get the partition back we claim a generation."""
        self.failed()
        self.partials.clear()

    def failed(self) -> None:
        """A batch's outputs were not all acknowledged: keep nothing the store may not hold. The
        next batch claims a generation again (above the stored one: snapshots of this one may
        be out) and sends every pipeline's snapshot."""
        self.generation = None
        self.last.clear()

    def latest(self) -> dict[str, KpiSnapshot]:
        return {pipeline: snapshot for pipeline, (_, _, snapshot) in self.last.items()}

    def process(self, records: list[Record], load: Callable[[str, Record], bytes | None],
                group_generation: int) -> Published:
        """``group_generation``: this worker's consumer-group generation now."""
        out = Published([], [], [], [])
        if not records:
            return out
        last = records[-1]
        if self.generation is None:
            self._claim(last, load, out)
            self.since_group_generation = group_generation
        for record in records:
            kind, partition, as_of, rows, top, lag, *rest = orjson.loads(record.value)  # type: ignore[arg-type]
            sent_in = rest[0] if rest else 0
            if sent_in < self.since_group_generation:
                continue  # sent before this owner took over: possibly by an owner since gone
            # A newer generation's partial wins whatever its clock says (with the stream clock,
            # each worker's time is the latest event it has seen); within one, the newer one.
            order = (sent_in, as_of)
            held = self.partials.get((kind, partition))
            if held is None or order >= held.order:
                found = rest[1] if len(rest) > 1 else None
                self.partials[(kind, partition)] = Partial(order, rows, top, lag, found)
        wanted = {(kind, p) for kind in ("deals", "customers") for p in range(self.partitions)}
        if not wanted <= set(self.partials):
            return out  # not every partition reported yet: no half-computed state
        now = max(partial.order[1] for partial in self.partials.values())
        samples = self._merged(now)
        if all(partial.lag <= MAX_CHECK_LAG for partial in self.partials.values()):
            self._check_conversion(samples, now, last, load, out)
        self._snapshots(samples, now, out)
        return out

    def _claim(self, last: Record, load: Callable[[str, Record], bytes | None],
               out: Published) -> None:
        """Become the publisher: the generation after the stored one, or for a fleet's first
        claim the wall clock in ms. Consumers keep the greater ``(generation, sequence)``: a
        rebuild's snapshots outrank the old fleet's, whose generations count up from its own
        first claim, one per take-over."""
        stored, fleet = load(GENERATION_KEY, last), load(FLEET_KEY, last)
        now_ms = int(time.time() * 1000)
        self.generation = int(stored) + 1 if stored else now_ms
        self.fleet = int(fleet) if fleet else now_ms
        self.sequence = 0
        out.claim.append((GENERATION_KEY, str(self.generation).encode()))
        if not fleet:
            out.claim.append((FLEET_KEY, str(self.fleet).encode()))

    def _merged(self, now: int) -> Samples:
        sums: dict[tuple[str, tuple], float] = {}
        for partial in self.partials.values():
            for name, labels, value in partial.rows:
                key = (name, tuple(sorted(labels.items())))
                sums[key] = sums.get(key, 0.0) + value
        config_only = KpiCollector(self.config, lambda: [], lambda: now, self.version)
        samples = collect_samples(config_only)  # zeros for every known series + config gauges
        for name in list(samples):
            if name not in CONFIG_METRICS:
                samples[name] = [(labels, 0.0) for labels, _ in samples[name]]
        for (name, labels), value in sums.items():
            samples.setdefault(name, []).append((dict(labels), value))
        return samples

    def _snapshots(self, samples: Samples, now: int, out: Published) -> None:
        generated = time.time()
        kept = fleet_kept(self.config, [partial.candidates for (kind, _), partial
                                        in self.partials.items() if kind == "deals"])
        for pipeline in self.config.pipelines:
            snapshot = build_snapshot(
                samples, self.config, pipeline, as_of_ms=now, generated_ms=int(generated * 1000),
                generation=self.generation or 0, sequence=self.sequence + 1,
                partitions=self.partitions, kept=kept[pipeline] if kept is not None else None,
                top_customers=top_customers(self.partials.values(), pipeline,
                                            self.config.default_currency),
            )
            content = snapshot.model_dump(exclude={"generated_at", "sequence", "as_of"})
            previous = self.last.get(pipeline)
            if previous and previous[0] == content and generated - previous[1] < REPUBLISH_SECONDS:
                continue
            self.sequence += 1
            self.last[pipeline] = (content, generated, snapshot)
            out.snapshots.append(snapshot)

    def _check_conversion(self, samples: Samples, now: int, last: Record,
                          load: Callable[[str, Record], bytes | None], out: Published) -> None:
        reached = {
            (pl, stage): {w: total(samples, "funnel_deals_reached_window", pipeline=pl, stage=stage,
                                   window=w) for w in agg.WINDOWS}
            for pl, stages in self.order.items() for stage in stages
        }
        for check in conversion_checks(reached, self.order, self.config.conversion_drop):
            key = f"drop|{check.pipeline}|{check.stage}"
            raw = load(key, last)
            # {"episode": n} between drops, with "id" and "since" during one; before episodes
            # were counted: null between drops, no "episode".
            state = (orjson.loads(raw) if raw else None) or {}
            episode, open_id = state.get("episode", 0), state.get("id")
            if check.dropped and open_id is None:
                # Only stored state in the id: a check redone after a failed batch (or by the
                # next publisher) sends the same one.
                ident = alert_id(key, self.fleet, episode + 1)
                out.alerts.append(self._alert("conversion.drop", check, now, ident))
                out.writes.append((key, orjson.dumps({"id": ident, "since": now,
                                                      "episode": episode + 1})))
            elif not check.dropped and open_id is not None:
                out.alerts.append(self._alert("conversion.recovered", check, now,
                                              alert_id(open_id, "recovered")))
                out.writes.append((key, orjson.dumps({"episode": episode})))

    def _alert(self, kind: str, check: ConversionCheck, now: int, ident: str) -> Alert:
        return Alert(
            id=ident, type=kind, pipeline=check.pipeline, stage=check.stage,  # type: ignore[arg-type]
            next_stage=check.next_stage, detected_at=iso(now),
            window=self.config.conversion_drop.window,
            conversion=check.conversion, baseline=check.baseline,
        )
