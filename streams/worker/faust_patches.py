"""The one change to faust-streaming the worker still needs; applied once per process.

Faust creates its consumer with ``fetch_max_wait_ms=1500`` and no setting to change it. A broker
holding fetches that long (Tansu does) adds up to 1.5 s to every round of table recovery and to
every partial on its way to the KPI publisher (the batch loop's own consumer has the setting).
The patch replaces a private factory, so it counts its calls
(``funnel_faust_patch_calls_total{patch}``): a release that stops calling it would silently
undo it, and tests/test_engine.py sees the count move in a real worker. The engine version is
pinned and checked (:mod:`streams.worker.engine`).

Patches of earlier versions are gone with the batch loop: F1 (an agent's queue cleared at the
end of recovery) and F4/F7 (Faust's commits past undelivered records) lost records of Faust's
streams, and no Faust stream carries anything whose loss matters any more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

PATCHES = ("create_worker_consumer",)
CALLS: Counter[str] = Counter()  # patch -> calls in this process


class PatchCalls(Collector):
    """``funnel_faust_patch_calls_total{patch}``: calls of each patched function."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "funnel_faust_patch_calls", "Calls of each patched Faust function "
            "(streams/worker/faust_patches.py) in this process", labels=["patch"],
        )
        for patch in PATCHES:
            family.add_metric([patch], CALLS[patch])
        yield family


def apply(fetch_max_wait_ms: int) -> None:
    """Wrap Faust's consumer factory once to give the consumer our fetch wait before it starts."""
    original = AIOKafkaConsumerThread._create_worker_consumer
    if getattr(original, "fetch_max_wait_ms", None) == fetch_max_wait_ms:
        return

    def create(self: AIOKafkaConsumerThread, transport: Any) -> Any:
        CALLS["create_worker_consumer"] += 1
        consumer = original(self, transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer

    create.fetch_max_wait_ms = fetch_max_wait_ms  # type: ignore[attr-defined]
    create.__wrapped__ = getattr(original, "__wrapped__", original)  # type: ignore[attr-defined]
    AIOKafkaConsumerThread._create_worker_consumer = create  # type: ignore[method-assign]
