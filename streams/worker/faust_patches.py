"""Fixes to faust-streaming 0.15 behaviour that loses or delays events; applied once per process.

Each is reproduced in ``bench/RELIABILITY-FINDINGS.md`` (F1, F4, F7) or measured (fetch wait).
They patch Faust classes in place because Faust offers no hook at these points. Each counts its
calls (``funnel_faust_patch_calls_total{patch}``): a Faust or aiokafka release that stops calling
a replaced function would silently undo its fix, and tests/test_engine.py sees every count move
in a real recovery and rebalance. The engine versions are pinned and checked (streams/worker/engine.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, ensure_aiokafka_TP
from faust.types import TP
from mode.utils.queues import FlowControlEvent
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

_faust_new_offset = Consumer._new_offset
_faust_perform_seek = Consumer.perform_seek

PATCHES = ("create_worker_consumer", "flow_control_resume", "new_offset", "perform_seek")
CALLS: Counter[str] = Counter()  # patch -> calls in this process


class PatchCalls(Collector):
    """``funnel_faust_patch_calls_total{patch}``: calls of each patched function."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "funnel_faust_patch_calls", "Calls of each patched Faust/aiokafka function "
            "(streams/worker/faust_patches.py) in this process", labels=["patch"],
        )
        for patch in PATCHES:
            family.add_metric([patch], CALLS[patch])
        yield family


def apply(fetch_max_wait_ms: int) -> None:
    _set_fetch_max_wait(fetch_max_wait_ms)
    FlowControlEvent.resume = _resume_without_dropping  # type: ignore[method-assign]
    Consumer._new_offset = _new_offset_from_committed  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek_rewinding  # type: ignore[method-assign]


def _set_fetch_max_wait(ms: int) -> None:
    """Faust creates its consumer with ``fetch_max_wait_ms=1500`` and no setting to change it;
    a broker holding fetches that long (Tansu does) adds up to 1.5 s to every event's latency.
    Wrap the factory once to give the consumer our value before it starts."""
    original = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, "fetch_max_wait_ms", None) == ms:
        return

    def create(self: AIOKafkaConsumerThread, transport: Any) -> Any:
        CALLS["create_worker_consumer"] += 1
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = ms
        return consumer

    create.fetch_max_wait_ms = ms  # type: ignore[attr-defined]
    create.__wrapped__ = getattr(original, "__wrapped__", original)  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create  # type: ignore[method-assign]


def _resume_without_dropping(self: FlowControlEvent) -> None:
    """F1: Faust resumes flow control again at the end of table recovery, while agents already
    consume; mode's resume() then clears the agents' queues and those events are lost until the
    next rebalance. Clear only when resuming from a real suspension (queues filled before it are
    stale and re-read after the seek)."""
    CALLS["flow_control_resume"] += 1
    was_suspended = self._suspend.is_set()
    self._suspend.clear()
    self._resume.set()
    if was_suspended:
        self.clear()


def _new_offset_from_committed(self: Consumer, tp: TP) -> int | None:
    """The offset to commit: the end of the run of acknowledged offsets that starts at the
    committed offset, or None while that offset itself is not acknowledged.

    F7: Faust commits the first run of acknowledged offsets and checks that it starts at the
    committed offset only when that offset is truthy (and then lets one missing offset
    through), so records fetched and dropped before a partition's first commit were committed
    past without being processed. F4: offsets re-delivered after the end-of-recovery seek are
    acknowledged twice, and Faust's run search stops at the first repeat.
    """
    CALLS["new_offset"] += 1
    acked = self._acked[tp]
    if not acked:
        return None
    unique = sorted(set(acked))
    if len(unique) != len(acked):
        acked[:] = unique
    head = unique[0]
    gaps = self._gap.get(tp)  # offsets Faust saw skipped by the broker count as acknowledged
    if gaps:
        head = min([head, *(interval.begin for interval in gaps.overlap(0, head))])
    if head > (self._committed_offset[tp] or 0):
        return None
    return _faust_new_offset(self, tp)


async def _perform_seek_rewinding(self: Consumer) -> None:
    """F7: Faust drops fetched records it has not delivered when a rebalance or recovery stops
    the flow, and relies on this seek to read them again; aiokafka's seek skips partitions
    without a committed offset (or committed at 0), so their dropped records were never read.
    Rewind those stream partitions to their beginning, as ``auto_offset_reset=earliest`` means,
    and remember where that is as the offset the first commit must start from."""
    CALLS["perform_seek"] += 1
    await _faust_perform_seek(self)
    changelogs = self.app.tables.changelog_topics
    uncommitted = [tp for tp in self.assignment()
                   if tp.topic not in changelogs and not self._committed_offset[tp]]
    if not uncommitted:
        return
    await self._thread.seek_to_beginning(  # type: ignore[attr-defined]
        *(ensure_aiokafka_TP(tp) for tp in uncommitted))
    for tp in uncommitted:
        start = await self.position(tp)
        self._read_offset[tp] = None
        self._committed_offset[tp] = start or None
