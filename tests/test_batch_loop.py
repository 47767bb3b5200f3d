"""The one batch loop end to end (issue 22): positions stored with the state, a revoked batch
that can no longer be called back, events on the wrong partition."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from models.kpis import total
from processors.records import kafka_partition
from streams.kafka import topics
from streams.worker.loop import EXIT_UNCONFIRMED_WRITES

from .conftest import DATASET_EVENTS, settled, wait_until
from .test_e2e_pipeline import assert_dataset_values, dataset_events, replay
from .test_reliability_crash import APP_ID, read_all
from .test_reliability_failures import assert_a_replay_from_scratch_agrees, exact, opening_and_closing

pytestmark = pytest.mark.broker
PARTITIONS = 4


class AsFaust(RoundRobinPartitionAssignor):
    """The protocol name of the worker's group: a group keeps its protocol while it exists."""

    name = "faust"


def reset_group_offsets(broker_url: str) -> None:
    """What Kafka leaves of a group's offsets for a topic the group does not subscribe to once
    ``offsets.retention.minutes`` passed: nothing, so a reader starts at the beginning. Tansu
    neither expires offsets nor lets a non-member commit, so a member joins the (empty) group
    with crm.events and commits the beginning."""

    async def commit() -> None:
        consumer = AIOKafkaConsumer(topics.EVENTS, bootstrap_servers=topics.bootstrap_servers(broker_url),
                                    group_id=APP_ID, enable_auto_commit=False,
                                    session_timeout_ms=6000, rebalance_timeout_ms=6000,
                                    partition_assignment_strategy=(AsFaust,))
        await consumer.start()
        try:
            while not consumer.assignment():
                await consumer.getmany(timeout_ms=500)
            await consumer.commit({tp: 0 for tp in consumer.assignment()})
        finally:
            await consumer.stop()

    asyncio.run(asyncio.wait_for(commit(), 60))


def test_expired_group_offsets_never_replay_the_history(broker, workers):
    """Finding 5: the positions in crm.events live in the deals changelog (compacted, never
    expired), not in a group that does not subscribe to crm.events."""
    first = workers("w1", FUNNEL_CLOCK="stream")
    first.wait_ready()
    replay(broker, dataset_events())
    settled([first], DATASET_EVENTS)
    first.stop()
    reset_group_offsets(broker.url)
    restarted = workers("w2", FUNNEL_CLOCK="stream", FUNNEL_DATA_DIR=first.env["FUNNEL_DATA_DIR"])
    restarted.wait_ready()
    samples = exact([restarted])
    time.sleep(3)  # anything re-read would be counted by now
    samples = restarted.samples()
    assert_dataset_values(samples)
    assert total(samples, "funnel_events_total") == 0, "the history was read again"


def test_a_revoked_batch_held_on_its_way_to_the_broker_never_lands_after_the_next_owner(broker, workers):
    """Finding 3: the first worker's batch passes every check, then its sends are held inside
    the producer while a second worker joins (rebalance timeout 6 s) and closes the held batch's
    deals. A revoke cannot call back writes handed to the producer, so the first worker exits
    before the group moves on; the deals changelog equals a replay from scratch. (The sends are
    held longer than any join takes: held 15 s, a slow join on a loaded box once let them land
    before the revoke, rightly, and the test's premise was gone.)"""
    opening, closing = opening_and_closing()
    held = workers("held", module="tests.faults", FAULT_HOLD_SENDS_SECONDS="600")
    held.wait_ready()
    replay(broker, opening)
    wait_until(lambda: "fault: holding the sends" in held.log_path.read_text(), 60,
               what="the held batch")
    joining = workers("joining")
    replay(broker, closing)
    exact([joining], timeout=120)
    wait_until(lambda: held.process.poll() is not None, 30, what="the held worker's exit")
    assert held.process.poll() == EXIT_UNCONFIRMED_WRITES, held.log_tail()
    exact([joining])
    assert_a_replay_from_scratch_agrees(workers, broker)


def produce_on(broker_url: str, records: list[tuple[bytes, dict, int]]) -> None:
    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=topics.bootstrap_servers(broker_url))
        await producer.start()
        try:
            for key, event, partition in records:
                await producer.send_and_wait(topics.EVENTS, orjson.dumps(event), key=key,
                                             partition=partition)
        finally:
            await producer.stop()

    asyncio.run(send())


def test_events_keyed_by_anything_but_the_deal_id_never_split_a_deal(broker, workers):
    """Finding 4: a producer keying by account puts a deal's later event on another partition;
    it goes to the DLQ with its reason instead of starting a second copy of the deal there."""
    worker = workers(FUNNEL_CLOCK="stream")
    worker.wait_ready()
    deal = "split-1"
    home = kafka_partition(deal.encode(), PARTITIONS)
    elsewhere = (home + 1) % PARTITIONS
    base = {"deal_id": deal, "source": "api", "amount": 100.0}
    produce_on(broker.url, [
        (deal.encode(), base | {"event_id": "a", "occurred_at": "2024-01-01T00:00:00Z",
                                "stage": "lead"}, home),
        (b"Acme", base | {"event_id": "b", "occurred_at": "2024-01-02T00:00:00Z",
                          "stage": "won"}, elsewhere),
        (b"Acme", {"deal_id": "new-2", "event_id": "c", "occurred_at": "2024-01-02T00:00:00Z",
                   "stage": "lead", "source": "api"},
         (kafka_partition(b"new-2", PARTITIONS) + 1) % PARTITIONS),
    ])
    samples = settled([worker], 3)
    assert total(samples, "funnel_events_total", outcome="accepted") == 1
    assert total(samples, "funnel_events_rejected_total", reason="wrong_partition") == 2
    assert total(samples, "funnel_deals_open", stage="lead") == 1
    assert total(samples, "funnel_deals_closed") == 0
    dlq = wait_until(lambda: read_all(broker.url, topics.DLQ) or None, 30, what="the DLQ copies")
    reasons = sorted(dict(m.headers)["funnel.reason"].decode() for m in dlq)
    assert reasons[0].startswith(f"deal 'new-2' belongs on partition {kafka_partition(b'new-2', 4)}")
    # held on its home partition, or not yet there if the other partition came first in a fetch
    assert reasons[1].startswith(f"deal 'split-1' is held on partition {home}, this event came on "
                                 f"{elsewhere} (key b'Acme')") or reasons[1].startswith(
        f"deal 'split-1' belongs on partition {home}, this event came on {elsewhere} (key b'Acme')")
