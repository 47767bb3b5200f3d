"""``python -m bench.recovery``: how long a worker takes to recover a large state (issue 7).

For each store (``memory://``, ``rocksdb://``) on a fresh embedded broker: ``--deals`` open
deals (one event each: a lead with amount, owner and account) are produced and ingested by a
worker, which is then stopped (SIGTERM). A new worker is started and timed from process start
to ``funnel_worker_ready`` = 1 and to ``funnel_deals_open`` = N (everything back):

- memory store: the state only lives in the changelog, so every restart reads all of it;
- RocksDB, warm: same data directory (a restart on the same machine): local state plus the
  changelog tail, then the folds are rebuilt by scanning the local table;
- RocksDB, cold: new data directory (a new machine, a lost disk): the whole changelog again.

Prints one line per figure as it goes and a table at the end (RSS from /proc). Sizes are
arguments; the default (300,000 deals) takes about 4 minutes on the 2-core box, 1,000,000 about
12 (``--deals 1000000``). Apache Kafka reads changelogs faster than the embedded broker; these
figures are an upper bound for the same box.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.workload import encode, open_deals, send
from models.kpis import parse_exposition, total
from streams.broker import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 4


class Worker:
    """``funnel-kpi worker`` as a subprocess; samples come from its ``/metrics``."""

    def __init__(self, broker_url: str, workdir: Path, name: str, data_dir: Path, **env: str):
        self.name = name
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, "FUNNEL_BROKER": broker_url, "FUNNEL_WEB_PORT": str(self.port),
                    "FUNNEL_WEB_BIND": "127.0.0.1", "FUNNEL_DATA_DIR": str(data_dir),
                    "FUNNEL_PARTITIONS": str(PARTITIONS), "FUNNEL_LOG_LEVEL": "warning",
                    "FUNNEL_SESSION_TIMEOUT": "6", "FUNNEL_REBALANCE_TIMEOUT": "6", **env}
        self.process: subprocess.Popen | None = None
        self.started = 0.0
        self.started_wall = 0.0

    def start(self) -> Worker:
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.process = subprocess.Popen([sys.executable, "-m", "streams.cli", "worker"], cwd=ROOT,
                                        env=self.env, stdout=self.log_path.open("ab"),
                                        stderr=subprocess.STDOUT)
        return self

    def metric(self, name: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30) as r:
                return total(parse_exposition(r.read().decode()), name)
        except OSError:
            return None

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def wait(self, name: str, target: float, timeout: float, poll: float = 0.2) -> float:
        """Seconds since start until ``name`` reaches ``target``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
            value = self.metric(name)
            if value is not None and value >= target:
                return time.monotonic() - self.started
            time.sleep(poll)
        raise TimeoutError(f"{self.name}: {name} did not reach {target} in {timeout:.0f}s "
                           f"(last {self.metric(name)})")

    def phases(self) -> tuple[float | None, float | None]:
        """(group joined, recovered) in seconds after start, from the worker's info log:
        the last "Successfully synced group" and the last "Worker ready" line."""
        synced = ready = None
        for line in self.log_path.read_text(errors="replace").splitlines():
            match = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
            if not match:
                continue
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) \
                + int(match.group(2)) / 1000 - self.started_wall
            if "Successfully synced group" in line:
                synced = stamp
            elif "Worker ready" in line:
                ready = stamp
        return synced, ready

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Row:
    store: str
    case: str
    deals: int
    joined_s: float | None
    ready_s: float
    all_back_s: float
    rss_mib: float

    @property
    def recovery_s(self) -> float | None:
        return None if self.joined_s is None else self.ready_s - self.joined_s


def run_store(store: str, deals: int, workdir: Path, timeout: float) -> list[Row]:
    rows = []
    env = {"FUNNEL_STORE": store, "FUNNEL_RECOVERY_CONSISTENCY_CHECK": "false"}
    name = store.split(":")[0]
    with EmbeddedBroker(log_path=workdir / f"broker-{name}.log") as broker:
        # one lead event per deal (amount, owner, account): every deal stays open
        sent_s = asyncio.run(send(broker.url, encode(open_deals(deals, f"rec-{name}", per_deal=1))))
        print(f"[{name}] produced {deals:,} events in {sent_s:.1f}s", flush=True)
        data = workdir / f"data-{name}"
        first = Worker(broker.url, workdir, f"{name}-ingest", data, **env).start()
        try:
            first.wait("funnel_worker_ready", 1, 120)
            t0 = time.monotonic()
            first.wait("funnel_events_total", deals, timeout, poll=1.0)
            ingest_s = time.monotonic() - t0
            opened = first.metric("funnel_deals_open")
            print(f"[{name}] ingested in {ingest_s:.1f}s ({deals / ingest_s:,.0f} ev/s); "
                  f"open deals {opened:,.0f}; RSS {first.rss_mib():,.0f} MiB", flush=True)
        finally:
            first.stop()
        cases = [("restart", data)]
        if store.startswith("rocksdb"):
            cases = [("warm restart (same data dir)", data),
                     ("cold restart (new data dir)", workdir / f"data-{name}-cold")]
        for case, data_dir in cases:
            worker = Worker(broker.url, workdir, f"{name}-{case.split()[0]}", data_dir,
                            **{**env, "FUNNEL_LOG_LEVEL": "info"}).start()
            try:
                ready = worker.wait("funnel_worker_ready", 1, timeout, poll=0.1)
                back = worker.wait("funnel_deals_open", deals, timeout, poll=0.2)
                joined, _ = worker.phases()
                row = Row(name, case, deals, joined, ready, back, worker.rss_mib())
            finally:
                worker.stop()
            rows.append(row)
            print(f"[{name}] {case}: group joined {_s(row.joined_s)}, ready {row.ready_s:.1f}s "
                  f"(recovery {_s(row.recovery_s)}), all {deals:,} deals exported "
                  f"{row.all_back_s:.1f}s after start; RSS {row.rss_mib:,.0f} MiB", flush=True)
    return rows


def _s(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.1f}s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.recovery",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--deals", type=int, default=300_000, help="open deals in the state")
    parser.add_argument("--stores", default="memory://,rocksdb://", help="comma-separated")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per wait")
    parser.add_argument("--workdir", type=Path, help="keep logs and data here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="funnel-recovery-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"large-state recovery: {args.deals:,} deals, {PARTITIONS} partitions, "
          f"embedded Tansu broker; logs in {workdir}", flush=True)
    rows: list[Row] = []
    for store in args.stores.split(","):
        rows.extend(run_store(store.strip(), args.deals, workdir, args.timeout))
    print()
    print(f"{'store':8} {'case':30} {'deals':>10} {'joined':>7} {'recovery':>9} {'ready':>7} "
          f"{'all back':>9} {'RSS MiB':>8}   (seconds after process start)")
    for row in rows:
        print(f"{row.store:8} {row.case:30} {row.deals:>10,} {_s(row.joined_s):>7} "
              f"{_s(row.recovery_s):>9} {row.ready_s:>6.1f}s {row.all_back_s:>8.1f}s "
              f"{row.rss_mib:>8,.0f}")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
