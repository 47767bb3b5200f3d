"""Throughput with TLS vs plaintext, side by side in one run.

``.venv/bin/python -m bench.tls [--events 100000] [--rounds 2]``: for each round, a fresh plain
Tansu and a fresh Tansu behind stunnel (bench/tls_broker.py) each get the same simulator
backlog; a raw aiokafka consumer (the ceiling) and the real ``funnel-kpi worker`` drain it
(throughput as bench/run.py defines it: after start-up and group join). Rounds alternate the
order (plain, TLS, then TLS, plain) so drift of a shared machine hits both; each mode keeps its
best rate. The ratio TLS / plaintext is printed for both, and the median CPU per event of the
worker and of stunnel: TLS costs CPU in the client and in the terminator (on Apache Kafka, the
broker itself), and CPU per event stays comparable when other load moves the rates.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path
from unittest.mock import patch

from bench import baselines, measure, workload
from bench.procs import FunnelWorker, http_get
from bench.tls_broker import TlsBroker, TlsFiles
from streams.tools.broker import EmbeddedBroker


def _run(mode: str, workdir: Path, messages: list, files: TlsFiles, timeout: float) -> dict:
    folder = workdir / f"{mode}-{len(list(workdir.iterdir()))}"
    folder.mkdir()
    broker = TlsBroker(files, folder) if mode == "tls" else EmbeddedBroker(log_path=folder / "broker.log")
    env = broker.env() if isinstance(broker, TlsBroker) else {"FUNNEL_BROKER": broker.url}
    # the bench's own clients (producer, raw consumer) read them too
    with patch.dict(os.environ, env), broker:
        n = len(messages)
        send_s = asyncio.run(workload.send(broker.url, messages))
        ceiling = asyncio.run(measure.raw_consume(broker.url, "crm.events", baselines.PARTITIONS, n,
                                                  baselines.CEILING))
        with FunnelWorker(broker.url, folder, f"funnel-{mode}", **env) as worker:
            pids = [worker.pid, broker.process.pid]
            if isinstance(broker, TlsBroker):
                pids.append(broker.stunnel.pid)
            drained = measure.drain(worker.count, n, worker.started_at, worker.check_alive,
                                    timeout=timeout, pids=tuple(pids))
            counted = measure.events_total(http_get(worker.url) or b"")
            if counted != n:
                raise AssertionError(f"{mode}: funnel_events_total = {counted}, expected {n}")
    cpu = drained.cpu_us_per_event()
    return {"mode": mode, "send_s": send_s, "ceiling": ceiling, "worker": drained.rate,
            "startup_s": drained.startup_s, "worker_cpu_us": cpu[0], "broker_cpu_us": cpu[1],
            "stunnel_cpu_us": cpu[2] if len(cpu) > 2 else 0.0, "foreign_cores": drained.foreign_cores}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.tls", description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="backlog size (default 100,000)")
    parser.add_argument("--rounds", type=int, default=2, help="plain+TLS pairs, order alternating")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per drain")
    parser.add_argument("--workdir", type=Path, default=None, help="keep logs here")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tls-"))
    workdir.mkdir(parents=True, exist_ok=True)
    files = TlsFiles.create(workdir / "certs")
    messages = workload.simulated(args.events, seed=11)
    runs = []
    for round_ in range(args.rounds):
        for mode in (("plain", "tls") if round_ % 2 == 0 else ("tls", "plain")):
            result = _run(mode, workdir, messages, files, args.timeout)
            runs.append(result)
            print(f"{mode:5}  ceiling {result['ceiling']:>9,.0f} ev/s   worker {result['worker']:>8,.0f} ev/s"
                  f"   CPU/event worker {result['worker_cpu_us']:.1f} µs, broker "
                  f"{result['broker_cpu_us']:.1f} µs, stunnel {result['stunnel_cpu_us']:.1f} µs"
                  f"   (send {result['send_s']:.1f}s, start-up {result['startup_s']:.1f}s, "
                  f"other load {result['foreign_cores']:.2f} cores)", flush=True)
    best = {mode: {key: max(r[key] for r in runs if r["mode"] == mode) for key in ("ceiling", "worker")}
            for mode in ("plain", "tls")}
    for key, label in (("worker", "funnel-kpi worker"), ("ceiling", "raw aiokafka consumer")):
        plain, tls = best["plain"][key], best["tls"][key]
        print(f"{label}: plaintext {plain:,.0f} ev/s, TLS {tls:,.0f} ev/s, "
              f"TLS / plaintext = {tls / plain:.2f}  (best of {args.rounds} each, {args.events:,} events)")
    # CPU per event holds up better than rates when the machine is shared: medians per mode.
    cpu = {mode: {key: measure.percentile([r[key] for r in runs if r["mode"] == mode], 50)
                  for key in ("worker_cpu_us", "stunnel_cpu_us")}
           for mode in ("plain", "tls")}
    print(f"worker CPU/event (median): plaintext {cpu['plain']['worker_cpu_us']:.1f} µs, TLS "
          f"{cpu['tls']['worker_cpu_us']:.1f} µs, TLS / plaintext = "
          f"{cpu['tls']['worker_cpu_us'] / cpu['plain']['worker_cpu_us']:.2f}; the terminator adds "
          f"{cpu['tls']['stunnel_cpu_us']:.1f} µs/event")
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
