"""Failure paths against the real broker and worker processes (issue 18): stall alerts at least
once, a customer with more won deals than a message can hold."""

from __future__ import annotations

import orjson
import pytest

from models.kpis import total
from streams import topics

from .conftest import credits_settled, wait_until
from .test_e2e_pipeline import read_topic, replay

pytestmark = pytest.mark.broker


def stalling_events():
    """A lead entered on 1 January and another deal's event on 10 February: with the stream
    clock the first one is 40 days in ``lead`` (stall_after 30d) at the next tick."""
    return [
        {"event_id": "s1", "deal_id": "stalled-deal", "source": "api", "stage": "lead",
         "occurred_at": "2024-01-01T00:00:00Z", "amount": 10.0},
        {"event_id": "f1", "deal_id": "fresh-deal", "source": "api", "stage": "lead",
         "occurred_at": "2024-02-10T00:00:00Z", "amount": 20.0},
    ]


def stall_alerts(broker, timeout):
    found = read_topic(broker, topics.ALERTS, lambda messages: any(
        orjson.loads(m.value)["type"] == "deal.stalled" for m in messages), timeout=timeout)
    return [alert for alert in (orjson.loads(m.value) for m in found)
            if alert["type"] == "deal.stalled"]


def stalled_in_the_table(worker):
    samples = worker.samples()
    return samples is not None and total(samples, "funnel_deals_stalled", stage="lead") == 1


def test_a_stall_alert_whose_send_fails_goes_out_on_the_retry(broker, workers):
    worker = workers(FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1", FUNNEL_TEST_FAIL_ALERT_SENDS="1")
    worker.wait_ready()
    replay(broker, stalling_events())
    wait_until(lambda: stalled_in_the_table(worker), 60, what="the lead stalled")
    alerts = stall_alerts(broker, timeout=30)
    assert [a["deal_id"] for a in alerts] == ["stalled-deal"], "the alert was lost"
    assert total(worker.samples(), "funnel_failed_batches_total", agent="ticks") >= 1


def test_a_kill_before_the_stall_alert_is_sent_raises_it_after_the_restart(broker, workers):
    doomed = workers("w1", FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1",
                     FUNNEL_TEST_CRASH_BEFORE_ALERTS="1")
    doomed.wait_ready()
    replay(broker, stalling_events())
    wait_until(lambda: doomed.process.poll() is not None, 60, what="the kill before the alert")
    assert doomed.process.returncode == 137
    survivor = workers("w2", FUNNEL_CLOCK="stream", FUNNEL_TICK_INTERVAL="1")
    survivor.wait_ready(90)
    alerts = stall_alerts(broker, timeout=60)
    assert [a["deal_id"] for a in alerts] == ["stalled-deal"], "the alert was lost"
    wait_until(lambda: stalled_in_the_table(survivor), 30, what="the stall remembered")


BIG_ACCOUNT_DEALS = 20_000


def won_deal(i, account="Megacorp"):
    """Deal ids as long as CRMs make them (a HubSpot/Salesforce id with its object prefix)."""
    return {"event_id": f"won-{i}", "deal_id": f"opportunity-0065g00000{i:08d}AAC-salesforce",
            "source": "api", "stage": "won",
            "occurred_at": "2024-03-01T00:00:00Z", "amount": 100 + i % 7, "account": account}


def test_an_account_with_20000_won_deals_keeps_its_lifetime_value_and_later_events_flow(broker, workers):
    """One row per account held every credited deal: at ~15,000 it outgrew a producer request
    and the account's credits partition stopped for good."""
    worker = workers()
    worker.wait_ready()
    replay(broker, [won_deal(i) for i in range(BIG_ACCOUNT_DEALS)])
    revenue = sum(100 + i % 7 for i in range(BIG_ACCOUNT_DEALS))

    def lifetime_value():
        samples = worker.samples()
        return samples and total(samples, "funnel_customer_lifetime_value_gsum")

    wait_until(lambda: lifetime_value() == revenue, 180, what=f"lifetime value {revenue}",
               show=lifetime_value)
    later = [won_deal(i) for i in range(BIG_ACCOUNT_DEALS, BIG_ACCOUNT_DEALS + 10)]
    later.append(won_deal(0, account="Smallco") | {"event_id": "moved-0",
                                                    "occurred_at": "2024-03-02T00:00:00Z"})
    replay(broker, later)
    expected = revenue + sum(100 + i % 7 for i in range(BIG_ACCOUNT_DEALS, BIG_ACCOUNT_DEALS + 10))
    wait_until(lambda: credits_settled(worker.samples()) and lifetime_value() == expected, 60,
               what="the later credits", show=lifetime_value)
    samples = worker.samples()
    assert total(samples, "funnel_customers") == 2
    assert total(samples, "funnel_won_revenue") == expected
