"""End to end on the real broker and worker: ``funnel-kpi backfill hubspot`` as a process against
a local HubSpot API, killed with SIGKILL mid-run and started again, beside the live webhook
session. The worker's /metrics then show exactly the KPIs of every change counted once."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys

import pytest

from models.kpis import total
from streams.crm.backfill import hubspot
from streams.crm.backfill.common import Page
from streams.kafka.settings import Settings
from streams.tools.producer import produce

from .conftest import ROOT, run_async, wait_until
from .crm_servers import TOKEN, HubSpotServer
from .test_backfill_convergence import live_events
from .test_sources_common import CTX, apply, fixture, kpis

pytestmark = pytest.mark.broker
STAGES = ["appointmentscheduled", "qualifiedtobuy", "presentationscheduled", "contractsent", "closedwon"]
EXTRA = 40


def many_deals() -> dict:
    """The session's deals and 40 more, each with a few stage moves, an amount and an owner."""
    doc = copy.deepcopy(fixture("backfill_hubspot.json"))
    for n in range(EXTRA):
        moves = n % len(STAGES) + 1
        times = [f"2025-10-{1 + n % 28:02d}T{10 + i:02d}:00:00.000Z" for i in range(moves)]
        doc["deals"].append({
            "id": str(300 + n), "createdAt": times[0], "updatedAt": times[-1], "archived": False,
            "properties": {"dealstage": STAGES[moves - 1]},
            "propertiesWithHistory": {
                "dealstage": [{"value": STAGES[i], "timestamp": times[i], "sourceType": "CRM_UI"}
                              for i in range(moves)][::-1],
                "amount": [{"value": str(100 * (n + 1)), "timestamp": times[0], "sourceType": "CRM_UI"}],
                "hubspot_owner_id": [{"value": str(n % 3), "timestamp": times[0], "sourceType": "CRM_UI"}]},
        })
    return doc


def expected_events(doc: dict) -> list[dict]:
    page = Page(0, [], None)
    for deal in doc["deals"]:
        page.add(hubspot.deal_events(deal, CTX))
    for deal in doc["archived"]:
        page.add(hubspot.archived_events(deal, CTX))
    return page.events


def worker_kpis(samples) -> dict:
    """The exported KPIs in the shape of the pure fold's counters (amounts in micro units)."""
    def values(name, keys, scale=1):
        return {tuple(labels[k] for k in keys): round(value * scale)
                for labels, value in samples.get(name, ()) if value}
    return {"open": values("funnel_deals_open", ("pipeline", "stage")),
            "closed": values("funnel_deals_closed", ("pipeline", "outcome")),
            "open_value": values("funnel_open_value", ("pipeline", "stage", "currency"), 1_000_000),
            "won_revenue": values("funnel_won_revenue", ("pipeline", "currency"), 1_000_000)}


def test_backfill_killed_and_resumed_beside_the_live_session_counts_every_change_once(
        broker, workers, tmp_path):
    doc = many_deals()
    session = live_events("hubspot")
    everything, _ = apply(session + expected_events(doc))
    expected = {name: {k: v for k, v in counters.items() if v}
                for name, counters in kpis(everything).items()
                if name in ("open", "closed", "open_value", "won_revenue")}
    assert expected["open"] and expected["won_revenue"]
    worker = workers()
    worker.wait_ready()
    settings = Settings(broker=broker.url, partitions=4)
    run_async(produce(settings, session[: len(session) // 2], progress=False))  # live before...
    token_file = tmp_path / "hubspot-token"
    token_file.write_text(TOKEN + "\n")
    with HubSpotServer(doc, page_size=2) as server:
        env = {**os.environ, "FUNNEL_BROKER": broker.url, "FUNNEL_PARTITIONS": "4",
               "FUNNEL_HUBSPOT_API_URL": server.url, "FUNNEL_HUBSPOT_ACCESS_TOKEN_FILE": str(token_file),
               "FUNNEL_BACKFILL_RATE": "4/1", "FUNNEL_BACKFILL_STATE_DIR": str(tmp_path / "state")}
        checkpoint = tmp_path / "state" / "backfill-hubspot.json"
        command = [sys.executable, "-m", "streams.tools.cli", "backfill", "hubspot"]
        first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: checkpoint.exists() and json.loads(checkpoint.read_text())["deals"] >= 10, 90,
                       what="a checkpoint past 10 deals")
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
        assert checkpoint.exists()
        stopped_at = json.loads(checkpoint.read_text())
        assert stopped_at["deals"] < len(doc["deals"])  # killed mid-run
        run_async(produce(settings, session[len(session) // 2:], progress=False))  # ...and during
        second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert second.returncode == 0, second.stderr[-2000:]
        assert f"resumed after {stopped_at['cursor']}" in second.stdout
        assert not checkpoint.exists()  # done: a next run starts over
    samples = wait_until(lambda: (s := worker.samples()) and worker_kpis(s) == expected and s, 120,
                         what="the worker's KPIs equal every change counted once",
                         show=lambda: worker_kpis(worker.samples() or {}))
    assert total(samples, "funnel_events_total", outcome="rejected") == 0
