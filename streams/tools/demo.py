"""``funnel-kpi demo``: embedded broker + worker + simulator, and a live KPI table.

The simulation covers the last ``HISTORY_DAYS + LIVE_DAYS`` days up to now. Its first
``HISTORY_DAYS`` (a past quarter) are sent at once, so won deals, win rate, cycle times and the
leaderboard have values within seconds of start; the last ``LIVE_DAYS`` follow at the demo's
pace as live traffic. The worker runs on the stream clock (the latest ``occurred_at``): windows,
periods and stalls are judged at the simulation's "now", which reaches the real now when the
live part ends. A wall clock would call deals stalled that the live part has yet to move.

The table is computed from the worker's own ``/metrics`` with the same functions as KPI
snapshots (:mod:`models.kpis`), so what the demo shows is what Prometheus would show.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from models.config import load_config
from models.kpis import Samples, parse_exposition, pipeline_kpis, total
from streams.kafka.settings import Settings
from streams.tools.broker import EmbeddedBroker, free_port, wait_for_port
from streams.tools.producer import produce
from streams.tools.simulator import DAY_S, Simulation

HISTORY_DAYS = 90   # seeded at once: a past quarter
LIVE_DAYS = 30      # then played at the demo's pace, up to now


def _money(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.1f}{unit}"
    return f"{value:,.0f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _days(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 86400:.1f} d"


def seeded_traffic(seed: int, deals: int, now: float) -> tuple[list[dict], list[dict]]:
    """The simulation split in send order: the history to seed at once, then the live part."""
    events = Simulation(seed=seed, deals=deals, days=HISTORY_DAYS + LIVE_DAYS, end=now).events()
    live_from = now - LIVE_DAYS * DAY_S
    split = next((i for i, event in enumerate(events)
                  if datetime.fromisoformat(event["occurred_at"]).timestamp() >= live_from),
                 len(events))
    return events[:split], events[split:]


def render(samples: Samples, url: str, pipeline: str, currency: str) -> str:
    kpis = pipeline_kpis(samples, pipeline, currency, top=5)
    outcomes = {
        outcome: int(total(samples, "funnel_events_total", outcome=outcome))
        for outcome in ("accepted", "duplicate", "stale", "ignored", "rejected")
    }
    lines = [
        f"funnel-kpi demo · pipeline {pipeline} · metrics at {url} · Ctrl-C stops",
        "events: " + "  ".join(f"{k} {v:,}" for k, v in outcomes.items()),
        "",
        f"{'stage':<13}{'open':>8}{'open value':>13}{'reached':>10}{'→ next':>9}{'avg stay':>11}",
    ]
    for row in kpis.stages:
        lines.append(
            f"{row.stage:<13}{row.open:>8,.0f}{_money(row.open_value):>13}{row.reached:>10,.0f}"
            f"{_pct(row.conversion_to_next):>9}{_days(row.avg_time_in_stage_s):>11}"
        )
    velocity = None if kpis.sales_velocity_per_s is None else kpis.sales_velocity_per_s * 86400
    lines += [
        "",
        f"won {kpis.won:,.0f}  lost {kpis.lost:,.0f}  win rate {_pct(kpis.win_rate)}  "
        f"avg deal size {_money(kpis.avg_deal_size)}  avg sales cycle {_days(kpis.avg_sales_cycle_s)}",
        f"won revenue {_money(kpis.won_revenue)}  pipeline {_money(kpis.pipeline_value)}  "
        f"weighted {_money(kpis.weighted_pipeline)}  velocity {_money(velocity)}/day",
        f"customers {kpis.customers:,.0f}  avg lifetime value {_money(kpis.avg_customer_lifetime_value)}",
        "top reps: " + "  ".join(
            f"{i}. {owner} {_money(value)}" for i, (owner, value) in enumerate(kpis.leaderboard, 1)
        ),
    ]
    return "\n".join(lines)


def _scrape(url: str) -> Samples | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return parse_exposition(response.read().decode())
    except OSError:
        return None


def run_demo(settings: Settings, *, seed: int, rate: float, deals: int,
             duration: float | None = None) -> int:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    config = load_config(settings.config)
    pipeline, currency = "default", config.default_currency
    workdir = Path(tempfile.mkdtemp(prefix="funnel-kpi-demo-"))
    port = settings.web_port
    with contextlib.suppress(TimeoutError):
        wait_for_port(port, timeout=0.2)
        port = free_port()  # the configured port is taken: use another one
    url = f"http://127.0.0.1:{port}/metrics"
    print(f"starting broker and worker (logs in {workdir}) ...", flush=True)
    broker = EmbeddedBroker(log_path=workdir / "broker.log").start()
    env = {
        **os.environ, "FUNNEL_BROKER": broker.url, "FUNNEL_WEB_PORT": str(port),
        "FUNNEL_CLOCK": "stream", "FUNNEL_DATA_DIR": str(workdir / "data"),
        "FUNNEL_PARTITIONS": "4", "FUNNEL_SESSION_TIMEOUT": "6",
        "FUNNEL_RECOVERY_CONSISTENCY_CHECK": "false",  # the embedded broker: see README
    }
    if settings.config:
        env["FUNNEL_CONFIG"] = str(settings.config)
    log = (workdir / "worker.log").open("wb")
    worker = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "worker"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    producer_settings = Settings(broker=broker.url, partitions=4)
    history, live = seeded_traffic(seed, deals, datetime.now(UTC).timestamp())
    print(f"seeding {len(history):,} events of the past {HISTORY_DAYS} days, then "
          f"{len(live):,} live events of the last {LIVE_DAYS} days at {rate:,.0f}/s", flush=True)
    stop = threading.Event()

    async def feed() -> None:
        for events, pace in ((history, 0.0), (live, rate)):
            sending = itertools.takewhile(lambda _: not stop.is_set(), events)
            await produce(producer_settings, sending, rate=pace, progress=False)

    feeder = threading.Thread(target=lambda: asyncio.run(feed()), daemon=True)
    feeder.start()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    started = time.monotonic()
    clear = "\033[H\033[J" if sys.stdout.isatty() else ""
    try:
        while not stop.is_set():
            if worker.poll() is not None:
                print(f"worker exited with {worker.returncode}; see {workdir / 'worker.log'}")
                return 1
            samples = _scrape(url)
            if samples and total(samples, "funnel_worker_ready") >= 1:
                print(clear + render(samples, url, pipeline, currency) + "\n", flush=True)
            else:
                print("waiting for the worker to join the group ...", flush=True)
            if duration is not None and time.monotonic() - started > duration:
                break
            stop.wait(2.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        feeder.join(10)
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()
        log.close()
        print("demo stopped", flush=True)
    return 0
