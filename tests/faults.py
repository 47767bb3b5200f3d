"""The real worker with faults injected by a test, never through hooks in production modules.

``python -m tests.faults worker`` (``workers(..., module="tests.faults")`` in the tests) wraps
production classes in this process according to ``FAULT_*`` variables, then runs the CLI:

- ``FAULT_CRASH_AFTER_WRITES=N``: exit 137 once the batch holding the N-th table write has it
  acknowledged, before its position rows are written (the most dangerous point for doubles);
- ``FAULT_FAIL_ALERT_SENDS=N``: the first N flushes of alerts are refused as a broker would;
- ``FAULT_CRASH_BEFORE_ALERTS=1``: exit 137 when a batch's alerts are about to be produced;
- ``FAULT_SLOW_FLUSHES=N`` and ``FAULT_SLOW_FLUSH_SECONDS=S``: the first N flushes with table
  writes wait S seconds before the fence (a slow worker);
- ``FAULT_HOLD_SENDS_SECONDS=S``: the first records produced with a deals changelog write wait S
  seconds inside the producer, after every check of the worker's (sends held on their way to the
  broker);
- ``FAULT_SLOW_RECOVERY_SECONDS=S``: each table's recovery completion is held S seconds or until
  a revoke (Faust runs table callbacks as tasks of their own, so a revoke does not cancel them);
- ``FAULT_FAIL_TRAILERS=N``: in the first N flushes whose writes include ``customers`` rows, the
  writes are acknowledged and then the trailers (position rows, end markers) refused as a broker
  would (a broker frozen between the two requests of a flush).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable

import faust
from aiokafka.errors import KafkaError

from streams.tools import cli
from streams.worker.loop import is_position_key
from streams.worker.outbox import BatchProducer, Outbox
from streams.worker.tables import FoldedTable

log = logging.getLogger("funnel_kpi.faults")


def _number(name: str) -> float:
    return float(os.environ.get(name, "0"))


def _table_writes(pending: list) -> int:
    return sum(1 for _, key, _, _, _, _, table in pending
               if table is not None and not is_position_key(key))


def _exit(why: str) -> None:
    log.warning("fault: %s: exiting hard", why)
    logging.shutdown()
    os._exit(137)


def _wrap_produce(step: Callable) -> None:
    real = Outbox._produce

    async def produce(self: Outbox, pending: list):
        await step(self, pending)
        written = await real(self, pending)
        return written

    Outbox._produce = produce


def install() -> None:
    crash_after = _number("FAULT_CRASH_AFTER_WRITES")
    fail_alerts = [_number("FAULT_FAIL_ALERT_SENDS")]
    crash_before_alerts = _number("FAULT_CRASH_BEFORE_ALERTS")
    writes = [0]

    async def before_produce(outbox: Outbox, pending: list) -> None:
        alerts = any(item[5] == "alerts" for item in pending)
        if alerts and crash_before_alerts:
            _exit("crash before the alerts are sent")
        if alerts and fail_alerts[0] > 0:
            fail_alerts[0] -= 1
            outbox.on_error("alerts")
            raise KafkaError("fault: alert send refused")

    _wrap_produce(before_produce)
    if crash_after:
        real = Outbox._produce

        async def counting(self: Outbox, pending: list):
            written = await real(self, pending)
            writes[0] += _table_writes(pending)
            if _table_writes(pending) and writes[0] >= crash_after:
                _exit(f"crash after {writes[0]} acknowledged table writes")
            return written

        Outbox._produce = counting
    _slow_flushes()
    _held_sends()
    _slow_recovery()
    _failed_trailers()


def _slow_flushes() -> None:
    budget = [_number("FAULT_SLOW_FLUSHES")]
    seconds = _number("FAULT_SLOW_FLUSH_SECONDS")
    if not budget[0]:
        return
    real = Outbox.flush

    async def flush(self: Outbox, *args, **kwargs):
        if budget[0] and _table_writes(self.pending):
            budget[0] -= 1
            log.warning("fault: holding a batch for %.0f s before its fence", seconds)
            await asyncio.sleep(seconds)
        return await real(self, *args, **kwargs)

    Outbox.flush = flush


def _held_sends() -> None:
    hold = [_number("FAULT_HOLD_SENDS_SECONDS")]
    if not hold[0]:
        return
    real = BatchProducer.produce

    async def produce(self: BatchProducer, records: list):
        if hold[0] and any(topic.endswith("-deals-changelog") and value
                           for topic, _, value, _, _ in records):
            seconds, hold[0] = hold[0], 0
            log.warning("fault: holding the sends of a batch for %.0f s", seconds)
            await asyncio.sleep(seconds)
            log.warning("fault: sending the held batch")
        return await real(self, records)

    BatchProducer.produce = produce


def _slow_recovery() -> None:
    seconds = _number("FAULT_SLOW_RECOVERY_SECONDS")
    if not seconds:
        return
    real = faust.Table.on_recovery_completed

    async def held(self: faust.Table, active_tps, standby_tps) -> None:
        await real(self, active_tps, standby_tps)
        if not isinstance(self, FoldedTable):
            return
        log.warning("fault: %s: holding a recovery completion", self.name)
        waited, generation = 0.0, self.generation
        while self.generation == generation and waited < seconds:
            await asyncio.sleep(0.1)
            waited += 0.1
        log.warning("fault: %s: completion released %s", self.name,
                    "by a revoke" if self.generation != generation else f"after {seconds:.0f} s")

    faust.Table.on_recovery_completed = held


def _failed_trailers() -> None:
    budget = [_number("FAULT_FAIL_TRAILERS")]
    if not budget[0]:
        return
    real = Outbox._produce
    refuse_next = [False]

    async def produce(self: Outbox, pending: list):
        if refuse_next[0]:
            refuse_next[0] = False
            self.on_error("changelog")
            log.warning("fault: refusing the trailers of a batch whose writes were acknowledged")
            raise KafkaError("fault: trailers refused")
        written = await real(self, pending)
        if budget[0] and any(table is not None and table.name == "customers" and value
                             for _, _, value, _, _, _, table in pending):
            budget[0] -= 1
            refuse_next[0] = True
        return written

    Outbox._produce = produce


if __name__ == "__main__":
    install()
    sys.exit(cli.main())
