"""Erasure of a person (owner or account): gone from state, KPIs and later events, also after a
restart and in a rebuild under a new app id; totals stay."""

import subprocess
import sys

import pytest

from models.deal import erased_name
from models.deal_codec import decode_deal
from models.kpis import total

from .conftest import DATASET_EVENTS, ROOT, cli, credits_settled, settled, wait_until
from .test_e2e_pipeline import dataset_events, replay
from .test_reliability_crash import latest_rows

pytestmark = pytest.mark.broker
NAME = "Darcel Schlecht"


def rep_revenue(samples):
    return {labels["owner"]: value for labels, value in samples["funnel_rep_won_revenue"]
            if labels["pipeline"] == "default"}


def restart_view(worker, pseudonym):
    """What a restarted worker shows of the erased person, for a failure message."""
    samples = worker.samples()
    if not samples:
        return "no /metrics"
    revenue = rep_revenue(samples)
    return {"pseudonym": revenue.get(pseudonym), "name": revenue.get(NAME),
            "events": {f"{labels['source']}/{labels['outcome']}": value
                       for labels, value in samples["funnel_events_total"] if value},
            "won": total(samples, "funnel_deals_closed", pipeline="default", outcome="won")}


def test_erase_an_owner_and_an_account(broker, workers):
    worker = workers(FUNNEL_CLOCK="stream")
    worker.wait_ready()
    replay(broker, dataset_events())
    settled([worker], DATASET_EVENTS)
    for name in (NAME, "Codehow"):
        result = subprocess.run(
            [sys.executable, "-m", "streams.tools.cli", "erase", name, "--broker", broker.url],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    pseudonym = erased_name(NAME)
    # Each partition applies the request on its own: the name goes partition by partition.
    wait_until(lambda: NAME not in rep_revenue(worker.samples()), 30, what="erasure applied")
    assert rep_revenue(worker.samples())[pseudonym] == 1_153_214
    # Later events naming the person are masked on arrival.
    replay(broker, [{"event_id": "late-1", "deal_id": "new-deal", "source": "api", "stage": "won",
                     "occurred_at": "2017-12-30T00:00:00Z", "amount": 10.0, "owner": NAME}])
    wait_until(lambda: rep_revenue(worker.samples()).get(pseudonym) == 1_153_224, 30,
               what="masked new event")
    assert NAME not in rep_revenue(worker.samples())
    # The customers table follows: the account's credits moved to its pseudonym.
    wait_until(lambda: total(worker.samples(), "funnel_customers", pipeline="default") == 85, 30,
               what="customers")
    worker.stop()
    restarted = workers("w1-again", FUNNEL_CLOCK="stream")
    restarted.wait_ready()
    replay(broker, [{"event_id": "late-2", "deal_id": "new-deal-2", "source": "api",
                     "stage": "won", "occurred_at": "2017-12-30T00:00:00Z", "amount": 5.0,
                     "owner": NAME}])
    wait_until(lambda: rep_revenue(restarted.samples()).get(pseudonym) == 1_153_229, 60,
               what="erasure survives a restart", show=lambda: restart_view(restarted, pseudonym))
    samples = restarted.samples()
    assert NAME not in rep_revenue(samples)
    assert total(samples, "funnel_deals_closed", pipeline="default", outcome="won") == 4240
    names_left = raw_names_in_deals(broker.url, APP_ID)
    assert names_left == set(), f"raw names left in the deals changelog: {names_left}"


APP_ID = "funnel-kpi"
ERASED = (NAME, "Codehow")


def raw_names_in_deals(broker_url: str, app_id: str) -> set[str]:
    """Erased names still in the latest version of any deal (owner history, account, credited
    accounts) in a deals changelog."""
    found = set()
    for key, value in latest_rows(broker_url, app_id).items():
        if value and not key.startswith(b"\x00"):
            deal = decode_deal(value)
            names = {owner for _, _, owner in deal.owners} | set(deal.credited_accounts)
            names.add(deal.value("account"))
            found |= names & set(ERASED)
    return found


def test_an_erasure_survives_a_rebuild_under_a_new_app_id(broker, workers):
    """The raw events still name the person (crm.events keeps everything): a rebuild replays
    them, and the erasures on funnel.erasures, shared by every fleet, are applied again."""
    worker = workers(FUNNEL_CLOCK="stream")
    worker.wait_ready()
    replay(broker, dataset_events())
    settled([worker], DATASET_EVENTS)
    for name in ERASED:
        result = cli("erase", name, "--broker", broker.url)
        assert result.returncode == 0, result.stderr
    pseudonym = erased_name(NAME)
    wait_until(lambda: rep_revenue(worker.samples()).get(pseudonym) == 1_153_214, 30,
               what="erasure applied")
    worker.stop()
    rebuilt = workers("rebuilt", FUNNEL_CLOCK="stream", FUNNEL_APP_ID="rebuilt")
    rebuilt.wait_ready()
    shown: set[str] = set()

    def rebuilt_in_full():
        samples = rebuilt.samples()
        if not samples:
            return None
        revenue = rep_revenue(samples)
        shown.update(set(revenue) & set(ERASED))
        done = revenue.get(pseudonym) == 1_153_214 and credits_settled(samples)
        return samples if done else None

    samples = wait_until(rebuilt_in_full, 90, what="the rebuild with the erasure applied",
                         interval=0.05)
    assert NAME not in rep_revenue(samples)
    assert total(samples, "funnel_customers", pipeline="default") == 85
    assert raw_names_in_deals(broker.url, "rebuilt") == set()
    print(f"names shown during the rebuild (before the erasures were read): {shown or 'none'}")
