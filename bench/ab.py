"""``python -m bench.ab TREE [TREE ...]``: funnel-kpi workers of several source trees drain the
same backlog on one broker, taking turns, so a change is measured against its base in one run.

This box's speed drifts by ±10 % within minutes (bench/PROFILE.md), so figures from separate
runs do not tell a 5 % change from noise; turns of A, B, A, B … on the same backlog do. Each
worker reads the backlog under its own consumer group, from the start.

Typical use: ``git worktree add /tmp/base HEAD`` then ``python -m bench.ab /tmp/base .``.
Prints every drain, then per tree the median events/s and worker CPU µs per event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

from bench import measure, workload
from bench.procs import FunnelWorker
from streams.tools.broker import EmbeddedBroker


def drain(broker: EmbeddedBroker, workdir: Path, tree: Path, name: str, events: int,
          timeout: float) -> measure.Drain:
    with FunnelWorker(broker.url, workdir, name, root=tree, FUNNEL_APP_ID=f"ab-{name}") as worker:
        assert broker.process is not None
        return measure.drain(worker.count, events, worker.started_at, worker.check_alive,
                             timeout=timeout, pids=(worker.pid, broker.process.pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (checkouts) to compare")
    parser.add_argument("--events", type=int, default=300_000, help="backlog size")
    parser.add_argument("--rounds", type=int, default=3, help="turns per tree")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a drain may take")
    args = parser.parse_args(argv)
    trees = [tree.resolve() for tree in args.trees]
    messages = workload.simulated(args.events, seed=11)  # the throughput phase's backlog
    workdir = Path(tempfile.mkdtemp(prefix="funnel-ab-"))
    results: dict[Path, list[measure.Drain]] = {tree: [] for tree in trees}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        asyncio.run(workload.send(broker.url, messages))
        for turn in range(args.rounds):
            for index, tree in enumerate(trees):
                drained = drain(broker, workdir, tree, f"{turn}-{index}", args.events, args.timeout)
                results[tree].append(drained)
                print(f"{tree}  {drained.rate:>9,.0f} ev/s  "
                      f"{drained.cpu_us_per_event()[0]:5.1f} µs CPU/event", flush=True)
    print(f"\nmedians over {args.rounds} turns of {args.events:,} events (logs: {workdir})")
    for tree, drains in results.items():
        rate = statistics.median(d.rate for d in drains)
        cpu = statistics.median(d.cpu_us_per_event()[0] for d in drains)
        print(f"{tree}  {rate:>9,.0f} ev/s  {cpu:5.1f} µs CPU/event")
    return 0


if __name__ == "__main__":
    sys.exit(main())
