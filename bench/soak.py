"""``python -m bench.soak``: the simulator at a steady rate against one worker (issue 7, item 6).

Starts an embedded broker and one worker (wall clock, memory store unless ``--store``), then
sends simulator traffic at ``--rate`` events/s for ``--minutes`` and samples the worker every
``--interval`` seconds: RSS (``process_resident_memory_bytes``), events counted, how far the
worker is behind what was sent (sent − counted, independent of the broker's highwater), the
worker's own ``funnel_consumer_lag_messages`` sum, and the deals in its state.

The traffic cycles over a fixed population of ``--deals`` deals: each cycle replays the same
simulated deals with fresh event ids and newer timestamps (a stream of updates to live deals).
Each cycle adds a few stage entries per deal until the per-deal caps (64 history entries, 16
owners, 32 dedup ids: models/deal.py) are reached after about 13 cycles; from then on the state
no longer grows and RSS must be flat. The default population (1,000 deals, ~6,000 events per
cycle) reaches the caps within the first half of a 10-minute run at 300 events/s. New deals
make the state grow by design (deals stay in the table: docs/operations.md, retention);
``--new-deals`` runs that variant.

Verdict (printed, exit 1 on FAIL): over the second half of the run RSS grows by less than
``--rss-slack`` MiB, and the backlog at the end is below two seconds of traffic.
Not part of the test suite (it runs for minutes): ``.venv/bin/python -m bench.soak --minutes 10``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from aiokafka import AIOKafkaProducer

from models.event import encode_event
from models.kpis import parse_exposition, total
from streams.kafka import client as kafka_client
from streams.kafka import topics
from streams.tools.broker import EmbeddedBroker, free_port
from streams.tools.simulator import Simulation

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4


def scrape(port: int):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return parse_exposition(response.read().decode())
    except OSError:
        return None


class Traffic(threading.Thread):
    """Paced simulator events; ``sent`` counts broker-acknowledged sends."""

    def __init__(self, broker_url: str, rate: float, deals: int, new_deals: bool) -> None:
        super().__init__(daemon=True)
        self.broker_url, self.rate, self.deals, self.new_deals = broker_url, rate, deals, new_deals
        self.sent = 0
        self.cycles = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def events(self):
        while True:
            cycle = self.cycles
            seed = 1000 + cycle if self.new_deals else 1000
            for event in Simulation(seed=seed, deals=self.deals, days=60).events():
                event = dict(event)
                event["event_id"] = f"{event['event_id']}:c{cycle}"
                yield event
            self.cycles += 1

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as exc:
            self.error = exc

    async def _run(self) -> None:
        producer = AIOKafkaProducer(**kafka_client.client_args(self.broker_url),
                                    linger_ms=5, acks="all")
        await producer.start()
        try:
            started = time.monotonic()
            pending = []
            for i, event in enumerate(self.events()):
                if self.halt.is_set():
                    break
                pending.append(await producer.send(topics.EVENTS, encode_event(event),
                                                   key=event["deal_id"].encode()))
                if len(pending) >= 200:
                    await asyncio.gather(*pending)
                    self.sent += len(pending)
                    pending.clear()
                ahead = (i + 1) / self.rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            await asyncio.gather(*pending)
            self.sent += len(pending)
        finally:
            await producer.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to send")
    parser.add_argument("--rate", type=float, default=300.0, help="events per second")
    parser.add_argument("--deals", type=int, default=1000, help="simulated deal population")
    parser.add_argument("--new-deals", action="store_true",
                        help="every cycle brings new deals (state grows by design)")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--store", default="memory://", help="memory:// or rocksdb://")
    parser.add_argument("--rss-slack", type=float, default=16.0,
                        help="MiB RSS may grow over the second half and still pass")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="funnel-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)

    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        asyncio.run(topics.ensure_topics(broker.url, topics.worker_topics("funnel-kpi", PARTITIONS),
                                         replication_factor=1, app_id="funnel-kpi"))
        port = free_port()
        env = {**os.environ, "FUNNEL_BROKER": broker.url, "FUNNEL_WEB_PORT": str(port),
               "FUNNEL_WEB_BIND": "127.0.0.1", "FUNNEL_DATA_DIR": str(workdir / "data"),
               "FUNNEL_PARTITIONS": str(PARTITIONS), "FUNNEL_STORE": args.store,
               "FUNNEL_LOG_LEVEL": "warning", "FUNNEL_RECOVERY_CONSISTENCY_CHECK": "false"}
        worker = subprocess.Popen([sys.executable, "-m", "streams.tools.cli", "worker"], cwd=ROOT,
                                  env=env, stdout=(workdir / "worker.log").open("ab"),
                                  stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not ((s := scrape(port)) and total(s, "funnel_worker_ready") == 1):
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"worker did not start; see {workdir / 'worker.log'}")
                time.sleep(0.5)
            print(f"soak: {args.rate:,.0f} events/s for {args.minutes:g} min, population "
                  f"{args.deals:,} deals{' (new every cycle)' if args.new_deals else ''}, "
                  f"store {args.store}; logs in {workdir}", flush=True)
            print(f"{'t (s)':>6} {'sent':>9} {'counted':>9} {'behind':>7} {'lag metric':>10} "
                  f"{'deals':>7} {'RSS MiB':>8}", flush=True)
            traffic = Traffic(broker.url, args.rate, args.deals, args.new_deals)
            traffic.start()
            started = time.monotonic()
            rows = []
            end = started + args.minutes * 60
            while True:
                now = time.monotonic()
                samples = scrape(port) or {}
                counted = total(samples, "funnel_events_total")
                deals = total(samples, "funnel_deals_open") + total(samples, "funnel_deals_closed")
                row = (now - started, traffic.sent, counted, max(traffic.sent - counted, 0),
                       total(samples, "funnel_consumer_lag_messages"), deals,
                       total(samples, "process_resident_memory_bytes") / 2**20)
                rows.append(row)
                print(f"{row[0]:>6.0f} {row[1]:>9,} {row[2]:>9,.0f} {row[3]:>7,.0f} "
                      f"{row[4]:>10,.0f} {row[5]:>7,.0f} {row[6]:>8.1f}", flush=True)
                if worker.poll() is not None:
                    raise SystemExit(f"worker died; see {workdir / 'worker.log'}")
                if traffic.error is not None:
                    raise SystemExit(f"traffic failed: {traffic.error!r}")
                if now >= end:
                    break
                time.sleep(min(args.interval, max(end - time.monotonic(), 0.1)))
            traffic.halt.set()
            traffic.join(30)
            # Let the worker drain what was sent, then take the final row.
            drain_deadline = time.monotonic() + 60
            while time.monotonic() < drain_deadline:
                counted = total(scrape(port) or {}, "funnel_events_total")
                if counted >= traffic.sent:
                    break
                time.sleep(0.5)
        finally:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()

    half = [r for r in rows if r[0] >= rows[-1][0] / 2]
    rss_growth = half[-1][6] - half[0][6]
    behind_end = rows[-1][3]
    max_behind = max(r[3] for r in rows)
    rate = (rows[-1][2] - rows[0][2]) / max(rows[-1][0] - rows[0][0], 1e-9)
    rss_ok = rss_growth < args.rss_slack
    lag_ok = behind_end < 2 * args.rate
    print()
    print(f"sent {traffic.sent:,} events ({traffic.cycles} full cycles over {args.deals:,} deals), "
          f"counted {counted:,.0f} after draining; processed {rate:,.0f} events/s on average")
    print(f"RSS {rows[0][6]:.1f} → {rows[-1][6]:.1f} MiB; second half {half[0][6]:.1f} → "
          f"{half[-1][6]:.1f} MiB ({rss_growth:+.1f} MiB, slack {args.rss_slack:g}): "
          f"{'flat' if rss_ok else 'GROWING'}")
    print(f"behind at the last sample {behind_end:,.0f} events (max {max_behind:,.0f}; "
          f"< {2 * args.rate:,.0f} = 2 s of traffic): {'no growing lag' if lag_ok else 'LAGGING'}")
    verdict = rss_ok and lag_ok
    print(f"soak: {'PASS' if verdict else 'FAIL'}")
    if args.workdir is None and verdict:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
