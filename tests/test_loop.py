"""The batch loop without a broker: positions, the fence, stall checks gated on the backlog.
A stand-in consumer (a test double) answers fetches, seeks and high-water marks."""

from __future__ import annotations

import asyncio

import orjson
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry, Gauge

from processors.records import Record
from streams.kafka.settings import Settings
from streams.worker.loop import MAX_CHECK_LAG, Batch, BatchLoop, position_key
from streams.worker.outbox import Revoked

EVENTS, CREDITS, ERASURES, PARTIALS = ("crm.events", "app-customer-credits", "funnel.erasures",
                                      "app-partials")


class Consumer:
    def __init__(self) -> None:
        self.fetches: list[dict] = []
        self.seeks: dict[TopicPartition, int | str] = {}
        self.highwaters: dict[TopicPartition, int] = {}

    def assign(self, tps) -> None:
        self.assigned = set(tps)

    def unsubscribe(self) -> None:
        self.assigned = set()

    def seek(self, tp, offset) -> None:
        self.seeks[tp] = offset

    async def seek_to_beginning(self, tp) -> None:
        self.seeks[tp] = "beginning"

    async def seek_to_end(self, tp) -> None:
        self.seeks[tp] = "end"

    def highwater(self, tp):
        return self.highwaters.get(tp)

    async def getmany(self, timeout_ms, max_records):
        return self.fetches.pop(0) if self.fetches else {}


def record(topic, partition, offset):
    return Record(None, b"{}", topic, partition, offset)


def loop_with(handle, stored=None, tick=3600.0):
    stored = stored or {}
    settings = Settings(tick_interval=tick, rebalance_timeout=1.0)
    loop = BatchLoop(settings, [EVENTS, CREDITS], ERASURES, PARTIALS,
                     Gauge("lag", "lag", ["topic", "partition"], registry=CollectorRegistry()),
                     handle, lambda p: stored.get(position_key(p)), lambda: False)
    loop.consumer = Consumer()
    return loop


def test_an_assignment_seeks_inputs_to_stored_positions_erasures_to_start_partials_to_end():
    async def scenario():
        loop = loop_with(None, {position_key(0): orjson.dumps({EVENTS: 7, CREDITS: 3})})
        loop.assign({0, 1}, epoch=5)
        await loop._apply_assignment()
        return loop.consumer.seeks

    seeks = asyncio.run(scenario())
    assert seeks == {TopicPartition(EVENTS, 0): 7, TopicPartition(CREDITS, 0): 3,
                     TopicPartition(EVENTS, 1): "beginning", TopicPartition(CREDITS, 1): "beginning",
                     TopicPartition(ERASURES, 0): "beginning", TopicPartition(PARTIALS, 0): "end"}


def test_a_batch_that_went_through_moves_the_positions_and_a_failed_one_seeks_back():
    handled: list[Batch] = []
    fail = [False, True]  # popped from the end: the first try fails, the second goes through

    async def handle(batch):
        handled.append(batch)
        if fail.pop():
            raise RuntimeError("flush failed")

    async def scenario():
        loop = loop_with(handle)
        loop.assign({0}, epoch=1)
        await loop._apply_assignment()
        fetch = {TopicPartition(EVENTS, 0): [record(EVENTS, 0, 0), record(EVENTS, 0, 1)],
                 TopicPartition(ERASURES, 0): [record(ERASURES, 0, 0)]}
        loop.consumer.fetches = [fetch, fetch]
        loop.consumer.seeks.clear()
        await loop._next_batch(1)  # fails: read again from where the batch started
        assert loop.positions.next == {}
        assert loop.consumer.seeks == {TopicPartition(EVENTS, 0): 0, TopicPartition(ERASURES, 0): 0}
        await loop._next_batch(1)
        return loop

    import streams.worker.loop as loop_module
    real_sleep, loop_module.asyncio.sleep = loop_module.asyncio.sleep, lambda s: real_sleep(0)
    try:
        loop = asyncio.run(scenario())
    finally:
        loop_module.asyncio.sleep = real_sleep
    assert [len(b.records[EVENTS]) for b in handled] == [2, 2]
    assert handled[1].positions == {0: {EVENTS: 2}}  # what the position rows will say
    assert loop.positions.next == {TopicPartition(EVENTS, 0): 2, TopicPartition(ERASURES, 0): 1}


def test_a_batch_fenced_by_a_revoke_moves_nothing_and_a_fetch_across_a_revoke_is_dropped():
    async def revoked(batch):
        raise Revoked("revoked meanwhile")

    async def scenario():
        loop = loop_with(revoked)
        loop.assign({0}, epoch=1)
        await loop._apply_assignment()
        loop.consumer.fetches = [{TopicPartition(EVENTS, 0): [record(EVENTS, 0, 0)]}]
        await loop._next_batch(1)
        assert loop.positions.next == {}
        loop.consumer.fetches = [{TopicPartition(EVENTS, 0): [record(EVENTS, 0, 0)]}]
        await loop._next_batch(2)  # fetched in epoch 2 while the loop is in epoch 1: dropped
        return loop

    assert asyncio.run(scenario()).positions.next == {}


def test_stall_checks_come_every_tick_and_skip_a_partition_catching_up_a_backlog():
    async def scenario():
        loop = loop_with(None, tick=0.05)
        loop.assign({0, 1}, epoch=1)
        await loop._apply_assignment()
        assert loop._checks_due() == []  # the first check waits an interval: no backlog known yet
        loop.consumer.highwaters = {TopicPartition(EVENTS, 0): 10,
                                    TopicPartition(EVENTS, 1): MAX_CHECK_LAG + 10}
        loop.positions.next = {TopicPartition(EVENTS, 0): 5, TopicPartition(EVENTS, 1): 5}
        await asyncio.sleep(0.06)
        due = loop._checks_due()
        return due, loop._checks_due()

    due, again = asyncio.run(scenario())
    assert due == [0] and again == []
