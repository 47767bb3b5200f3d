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
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.baselines import PARTITIONS
from bench.procs import FunnelWorker
from bench.workload import encode, open_deals, send
from streams.tools.broker import EmbeddedBroker


def phases(worker: FunnelWorker) -> tuple[float | None, float | None]:
    """(group joined, recovered) in seconds after the worker's start, from its info log: the
    last "Successfully synced group" and the last "Worker ready" line."""
    synced = ready = None
    for line in worker.log_path.read_text(errors="replace").splitlines():
        match = re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
        if not match:
            continue
        stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S")) \
            + int(match.group(2)) / 1000 - worker.started_wall
        if "Successfully synced group" in line:
            synced = stamp
        elif "Worker ready" in line:
            ready = stamp
    return synced, ready


def _rss_mib(worker: FunnelWorker) -> float:
    return worker.rss_bytes() / 2**20


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
        first = FunnelWorker(broker.url, workdir, f"{name}-ingest", data_dir=data, **env).start()
        try:
            first.wait_for("funnel_worker_ready", 1, 120)
            t0 = time.monotonic()
            first.wait_for("funnel_events_total", deals, timeout, poll=1.0)
            ingest_s = time.monotonic() - t0
            opened = first.metric("funnel_deals_open", timeout=30)
            print(f"[{name}] ingested in {ingest_s:.1f}s ({deals / ingest_s:,.0f} ev/s); "
                  f"open deals {opened:,.0f}; RSS {_rss_mib(first):,.0f} MiB", flush=True)
        finally:
            first.stop()
        cases = [("restart", data)]
        if store.startswith("rocksdb"):
            cases = [("warm restart (same data dir)", data),
                     ("cold restart (new data dir)", workdir / f"data-{name}-cold")]
        for case, data_dir in cases:
            worker = FunnelWorker(broker.url, workdir, f"{name}-{case.split()[0]}",
                                  data_dir=data_dir, **{**env, "FUNNEL_LOG_LEVEL": "info"}).start()
            try:
                ready = worker.wait_for("funnel_worker_ready", 1, timeout, poll=0.1)
                back = worker.wait_for("funnel_deals_open", deals, timeout, poll=0.2)
                joined, _ = phases(worker)
                row = Row(name, case, deals, joined, ready, back, _rss_mib(worker))
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
