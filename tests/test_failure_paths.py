"""Failure paths without a broker (issue 18): a batch that fails mid-way leaves nothing behind in
memory, a revoke overtakes a late recovery, customer rows stay small, the fleet clock ignores an
outlier."""

import time

import orjson
import pytest
from faust.assignor.client_assignment import ClientAssignment
from faust.types import TP

import processors.deals as processor_module
import streams.worker.loop as loop_module
from models.config import Clock, load_config
from models.deal_codec import decode_deal, encode_deal
from models.fold import Fold
from processors.clock import EventClock
from processors.customers import CustomerProcessor, customer_key
from processors.deals import DealProcessor
from processors.records import Record
from streams.kafka import topics
from streams.tools.broker import free_port
from streams.worker.loop import Batch

CONFIG = load_config()


def deal_processor(store=None):
    """A processor over ``store`` (a dict standing in for the deals table, one partition)."""
    proc = DealProcessor(CONFIG, EventClock(Clock.STREAM), max_skew_ms=86_400_000,
                         scan=lambda partition: list((store or {}).items()))
    proc.folds.rebuild({0}, ())
    return proc, None


def event(deal_id, n, **change):
    return Record(None, orjson.dumps({"event_id": f"{deal_id}-{n}", "deal_id": deal_id,
                                      "source": "api", "amount": 100.0 * n, "account": "Acme",
                                      "occurred_at": f"2024-01-0{n}T00:00:00Z", **change}),
                  "crm.events", 0, n)


def rebuilt_fold(proc, store):
    return Fold.of(proc.contribution_of_stored(raw)[1] for raw in store.values()).snapshot()


class FailingContribution:
    """``deal_contribution`` that raises for one deal once it is won: the second deal of a batch
    fails after the first deal's fold update (a bug, a corrupt value, a config mismatch)."""

    def __init__(self, deal_id):
        self.deal_id = deal_id
        self.real = processor_module.deal_contribution

    def __call__(self, deal, config):
        if deal.deal_id == self.deal_id and deal.history and deal.history[-1][2] == "won":
            raise ValueError("contribution failed")
        return self.real(deal, config)


def test_a_batch_that_fails_mid_way_leaves_the_folds_as_the_store_says_on_every_retry(monkeypatch):
    store = {}
    proc, _ = deal_processor(store)
    first = proc.process([event("d1", 1, stage="lead"), event("d2", 1, stage="lead")],
                         store.get)
    store.update((deal_id, value) for deal_id, value, _ in first.writes)
    monkeypatch.setattr(processor_module, "deal_contribution", FailingContribution("d2"))
    batch = [event("d1", 2, stage="won"), event("d2", 2, stage="won"), event("d3", 2, stage="lead")]
    for _ in range(3):  # what the events consumer does: seek back and read the batch again
        with pytest.raises(ValueError, match="contribution failed"):
            proc.process(batch, store.get)
        assert proc.folds.folds[0].snapshot() == rebuilt_fold(proc, store)
    monkeypatch.undo()
    done = proc.process(batch, store.get)
    store.update((deal_id, value) for deal_id, value, _ in done.writes)
    assert proc.folds.folds[0].snapshot() == rebuilt_fold(proc, store)
    won = proc.folds.folds[0].counters["closed"][("default", "won")]
    assert won == 2


def credit(account, deal_id, micro, pipeline="default", currency="USD"):
    value = orjson.dumps([deal_id, pipeline if micro is not None else None,
                          currency if micro is not None else None, micro])
    return Record(account.encode(), value, "credits", 0, 0)


def apply_credits(customers, store, credits):
    batch = customers.process(credits, store.get)
    for key, value, _ in batch.writes:
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
    customers.commit(batch)


def test_a_customer_row_stays_small_however_many_deals_the_account_wins():
    customers, store = CustomerProcessor(), {}
    customers.folds.rebuild({0}, ())
    credits = [credit("Megacorp", f"d{i}", (100 + i % 7) * 1_000_000) for i in range(20_000)]
    for start in range(0, len(credits), 500):
        apply_credits(customers, store, credits[start:start + 500])
    assert max(len(value) for value in store.values()) < 100
    won = sum(100 + i % 7 for i in range(20_000)) * 1_000_000
    assert customers.folds.folds[0].accounts == {("default", "USD", "Megacorp"): won}


def test_customer_rows_are_idempotent_under_re_sent_and_moved_credits():
    customers, store = CustomerProcessor(), {}
    customers.folds.rebuild({0}, ())
    apply_credits(customers, store, [credit("Acme", "d1", 5), credit("Acme", "d2", 7)])
    apply_credits(customers, store, [credit("Acme", "d1", 5), credit("Acme", "d1", 5)])  # re-sent
    apply_credits(customers, store, [credit("Acme", "d2", None), credit("Globex", "d2", 7),
                                     credit("Acme", "d3", 0)])  # moved; a won deal of 0
    fold = customers.folds.folds[0]
    assert fold.accounts == {("default", "USD", "Acme"): 5, ("default", "USD", "Globex"): 7}
    assert fold.counters["customers"] == {("default",): 2}
    rebuilt = CustomerProcessor()
    rebuilt.folds.rebuild({0}, rebuilt.contributions_of_stored(store.values()))
    assert rebuilt.folds.folds[0].snapshot() == fold.snapshot()
    apply_credits(customers, store, [credit("Acme", "d1", None), credit("Acme", "d3", None)])
    assert fold.accounts == {("default", "USD", "Globex"): 7}
    assert fold.counters["customers"] == {("default",): 1}


def test_a_customer_batch_whose_rows_were_not_written_changes_nothing_on_the_redelivery():
    """Issue 22.2: the processor once moved totals and folds before the flush; a failed flush
    and the redelivery counted one credit of 100 as 200 (or, the other way, a rebuild lost it)."""
    customers, store = CustomerProcessor(), {}
    customers.folds.rebuild({0}, ())
    customers.process([credit("Acme", "d1", 100)], store.get)  # its flush fails: not committed
    assert customers.folds.folds[0].accounts == {}
    apply_credits(customers, store, [credit("Acme", "d1", 100)])  # the redelivery goes through
    assert customers.folds.folds[0].accounts == {("default", "USD", "Acme"): 100}
    rebuilt = CustomerProcessor()
    rebuilt.folds.rebuild({0}, rebuilt.contributions_of_stored(store.values()))
    assert rebuilt.folds.folds[0].snapshot() == customers.folds.folds[0].snapshot()


def test_a_credit_that_does_not_decode_goes_to_the_dlq_and_the_others_count():
    """The credits topic is the workers' own, but another producer or version may write it: a
    bad credit used to fail its batch on every try, and the loop stopped for good."""
    customers, store = CustomerProcessor(), {}
    customers.folds.rebuild({0}, ())
    bad = [Record(b"Acme", value, "credits", 0, 1)
           for value in (b"not json", b'["d1", "default", "USD"]', b'["d1", "default", "USD", 1.5]',
                         b'[7, "default", "USD", 5]', b'["d1", null, "USD", 5]')]
    batch = customers.process([*bad, credit("Acme", "d2", 100)], store.get)
    assert [(r.code, r.record.value) for r in batch.rejections] == [
        ("invalid_credit", record.value) for record in bad]
    assert all("not a credit" in r.reason for r in batch.rejections)
    assert [key for key, _, _ in batch.writes] == [customer_key("Acme", "d2")]
    customers.commit(batch)
    assert customers.folds.folds[0].accounts == {("default", "USD", "Acme"): 100}


def test_a_customers_table_of_the_old_format_is_refused_with_a_clear_error():
    old_row = orjson.dumps([0, "Acme", {"d1": ["default", "USD", 5]}])
    with pytest.raises(ValueError, match="new FUNNEL_APP_ID"):
        list(CustomerProcessor().contributions_of_stored([old_row]))


def offline_worker(tmp_path):
    """A worker built but never started (no broker): its tables' callbacks are called by hand,
    in the order Faust calls them."""
    from streams.kafka.settings import Settings
    from streams.worker.app import FunnelWorker

    worker = FunnelWorker(Settings(broker="kafka://127.0.0.1:9", data_dir=tmp_path, partitions=4,
                                   web_port=free_port()))
    anchor = worker.assignment_topic.get_topic_name()
    credits_ = worker.credits_topic.get_topic_name()
    worker.app.assignor._assignment = ClientAssignment(  # what the group's sync hands over
        actives={anchor: [0, 1], credits_: [0, 1]}, standbys={})
    return worker, {TP(anchor, 0), TP(anchor, 1), TP(credits_, 0), TP(credits_, 1)}


def served(worker):
    return (sorted(worker.deal_processor.folds.folds), sorted(worker.loop._wanted),
            worker.readiness.tables_ready())


async def recover(worker, tps, *, rebalance=True, generation=1):
    tables = (worker.deals, worker.customers)
    if rebalance:
        worker.app.consumer_generation_id = generation  # what the group's join hands over
        for table in tables:
            await table.on_rebalance(tps, set(), tps, generation)
    for table in tables:
        await table.on_recovery_completed(tps, set())


def test_a_recovery_completed_after_a_revoke_assigns_and_exports_nothing(tmp_path):
    import asyncio

    async def scenario():
        worker, tps = offline_worker(tmp_path)
        await recover(worker, tps)
        assert served(worker) == ([0, 1], [0, 1], True)
        await worker._on_revoked(worker.app, tps)
        assert served(worker) == ([], [], False)
        await recover(worker, tps, rebalance=False)  # the revoked assignment's late completion
        assert served(worker) == ([], [], False)
        worker.app.consumer_generation_id = 2
        for table in (worker.deals, worker.customers):
            await table.on_rebalance(tps, set(), tps, 2)
        worker.app.tables.recovery.signal_recovery_start.set()  # a newer assignment is recovering
        await recover(worker, tps, rebalance=False)
        assert served(worker) == ([], [], False)
        worker.app.tables.recovery.signal_recovery_start.clear()  # its recovery starts ...
        await recover(worker, tps, rebalance=False)               # ... and completes
        assert served(worker) == ([0, 1], [0, 1], True)
        assert worker.loop.epoch == 2

    asyncio.run(scenario())


def test_an_event_dated_a_day_ahead_of_the_broker_never_moves_the_stream_clock():
    proc, _ = deal_processor()
    store = {}
    broker_ms = 1_704_067_200_000 + 3_600_000  # an hour after the normal event
    normal = event("d1", 1, stage="lead")
    ahead = Record(None, orjson.dumps({"event_id": "x", "deal_id": "d2", "source": "api",
                                       "stage": "lead", "occurred_at": "2024-01-02T00:00:00Z"}),
                   "crm.events", 0, 2)
    for record in (normal, ahead):
        record.timestamp = broker_ms
    batch = proc.process([normal, ahead], store.get)
    store.update((deal_id, value) for deal_id, value, _ in batch.writes)
    assert proc.clock.now_ms() == 1_704_067_200_000  # the event is counted, the clock stays
    assert proc.folds.folds[0].counters["open"][("default", "lead")] == 2
    restarted, _ = deal_processor()
    future = decode_deal(store["d2"])
    future.history[-1] = (int(time.time() * 1000) + 86_400_000, *future.history[-1][1:])
    restarted.folds.rebuild({0}, restarted.contributions_of_stored([store["d1"], encode_deal(future)]))
    assert restarted.clock.now_ms() == 1_704_067_200_000  # nor does it when read back


def test_a_revoke_waits_for_the_batch_in_flight_at_most_half_the_rebalance_timeout(tmp_path):
    """A revoke handler that outwaits the rebalance timeout gets the worker dropped from the
    group while its batch still writes: it returns after half of it, the batch fenced."""
    import asyncio

    async def scenario():
        worker, _ = offline_worker(tmp_path)
        loop = worker.loop
        loop.settings = loop.settings.model_copy(update={"rebalance_timeout": 1.0})
        loop.assign({0, 1}, 1)
        loop._idle.clear()  # a batch in flight that has not produced anything yet
        await asyncio.wait_for(loop.revoke(), 30)
        assert loop.epoch is None and loop._wanted == frozenset()

    asyncio.run(scenario())


def test_a_revoke_ends_the_process_when_a_batch_is_still_producing(tmp_path, monkeypatch):
    """Writes already handed to the producer cannot be called back: rather than let them land
    after the next owner's, the worker exits once the revoke has waited half the timeout."""
    import asyncio

    exits = []
    monkeypatch.setattr(loop_module.os, "_exit", exits.append)

    async def scenario():
        worker, _ = offline_worker(tmp_path)
        loop = worker.loop
        loop.settings = loop.settings.model_copy(update={"rebalance_timeout": 1.0})
        loop._idle.clear()
        worker.outbox.producing = True
        await asyncio.wait_for(loop.revoke(), 30)

    asyncio.run(scenario())
    assert exits == [loop_module.EXIT_UNCONFIRMED_WRITES]


def test_a_batch_that_a_revoke_overtakes_writes_nothing(tmp_path):
    import asyncio

    from streams.worker.outbox import Revoked

    async def scenario():
        worker, tps = offline_worker(tmp_path)
        await recover(worker, tps)
        real = worker.deal_processor.process

        def revoked_meanwhile(*args):
            batch = real(*args)
            worker.loop.epoch = None  # the group moved on while the batch was processed
            return batch

        worker.deal_processor.process = revoked_meanwhile
        batch = Batch(1, {topics.EVENTS: [event("d1", 1, stage="lead")],
                          worker.credits_topic.get_topic_name(): [], topics.ERASURES: [],
                          worker.partials_topic.get_topic_name(): []},
                      {0: {topics.EVENTS: 2}}, [])
        with pytest.raises(Revoked):
            await asyncio.wait_for(worker.loop.handle(batch), 30)
        assert list(worker.deals.data.keys()) == [] and worker.outbox.pending == []
        assert worker.deal_processor.folds.folds[0].snapshot() == Fold().snapshot()

    asyncio.run(scenario())


def test_undoing_a_batch_never_touches_folds_rebuilt_since():
    proc, _ = deal_processor()
    batch = proc.process([event("d1", 1, stage="lead")], lambda key: None)
    proc.folds.rebuild({0}, ())  # a revoke and a new assignment while the batch was held
    proc.undo(batch)
    assert proc.folds.folds[0].snapshot() == Fold().snapshot()


def test_a_batch_failing_after_its_deals_were_processed_takes_their_folds_back(tmp_path):
    """A failure anywhere in a batch (here the customers store failing a read) leaves the deal
    folds as the store says: the batch is read again, and its events must not count twice."""
    import asyncio

    async def scenario():
        worker, tps = offline_worker(tmp_path)
        await recover(worker, tps)
        credits_topic = worker.credits_topic.get_topic_name()

        def unreadable(key):
            raise OSError("store read failed")

        worker.customers.read = unreadable
        lead = event("d5", 1, stage="lead")
        lead.key = b"d5"  # partition 0 of 4 by Kafka's partitioner
        batch = Batch(1, {topics.EVENTS: [lead],
                          credits_topic: [Record(b"Acme", orjson.dumps(["d9", "default", "USD", 5]),
                                                 credits_topic, 0, 0)],
                          topics.ERASURES: [], worker.partials_topic.get_topic_name(): []},
                      {0: {topics.EVENTS: 1}}, [])
        with pytest.raises(OSError):
            await asyncio.wait_for(worker.loop.handle(batch), 30)
        assert worker.deal_processor.folds.folds[0].snapshot() == Fold().snapshot()

    asyncio.run(scenario())


def test_an_erasure_read_with_a_deals_first_events_erases_that_deal_too():
    """An erasure and the first events of a deal naming the person, in one batch: the erasure
    used to be applied after the events, to the stored deals only, and the new deal was written
    with the raw names (a rebuild under a new app id showed them on the leaderboard)."""
    from models.deal import erased_name

    store = {}
    proc, _ = deal_processor(store)
    batch = proc.process([event("d1", 1, stage="won", owner="Ann Example")], store.get,
                         erasures=[erased_name("Ann Example"), erased_name("Acme")])
    [(_, value, _)] = batch.writes
    deal = decode_deal(value)
    assert deal.owner == erased_name("Ann Example")
    assert deal.value("account") == erased_name("Acme")
    assert [credit.account for credit in batch.credits] == [erased_name("Acme")]
