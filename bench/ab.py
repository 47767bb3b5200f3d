"""``python -m bench.ab TREE [TREE ...]``: funnel-kpi workers of several source trees drain the
same backlog on one broker, taking turns, so a change is measured against its base in one run.

This box's speed drifts by ±10 % within minutes (bench/PROFILE.md), so figures from separate
runs do not tell a 5 % change from noise; turns of A, B, A, B … on the same backlog do. Each
worker reads the backlog under its own consumer group, from the start.

Typical use: ``git worktree add /tmp/base HEAD`` then ``python -m bench.ab /tmp/base .``.
Prints every drain, then per tree the median events/s and worker CPU µs per event.

``--dimensions``: the backlog's events carry three deal properties (bench/workload.py), and each
tree runs twice per turn, with a funnel config naming them as dimensions and with the shipped
one (which ignores them): the cost of the per-dimension KPIs, as a ratio of CPU per event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

from bench import measure, workload
from bench.procs import FunnelWorker
from models.config import DEFAULT_CONFIG
from streams.tools.broker import EmbeddedBroker


def drain(broker: EmbeddedBroker, workdir: Path, tree: Path, name: str, events: int,
          timeout: float, **env: str) -> measure.Drain:
    with FunnelWorker(broker.url, workdir, name, root=tree, FUNNEL_APP_ID=f"ab-{name}",
                      **env) as worker:
        assert broker.process is not None
        return measure.drain(worker.count, events, worker.started_at, worker.check_alive,
                             timeout=timeout, pids=(worker.pid, broker.process.pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (checkouts) to compare")
    parser.add_argument("--events", type=int, default=300_000, help="backlog size")
    parser.add_argument("--rounds", type=int, default=3, help="turns per tree")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a drain may take")
    parser.add_argument("--dimensions", action="store_true",
                        help="each tree with three dimensions configured and with none")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="funnel-ab-"))
    events = workload.simulated_events(args.events, seed=11)  # the throughput phase's backlog
    variants: list[tuple[str, dict[str, str]]] = [("", {})]
    if args.dimensions:
        events = workload.with_properties(events)
        variants = [(" (no dimensions)", {}),
                    (" (3 dimensions)", {"FUNNEL_CONFIG": str(dimensions_config(workdir))})]
    runs = [(f"{tree.resolve()}{label}", tree.resolve(), env)
            for tree in args.trees for label, env in variants]
    results: dict[str, list[measure.Drain]] = {name: [] for name, _, _ in runs}
    with EmbeddedBroker(log_path=workdir / "broker.log") as broker:
        asyncio.run(workload.send(broker.url, workload.encode(events)))
        for turn in range(args.rounds):
            for index, (name, tree, env) in enumerate(runs):
                drained = drain(broker, workdir, tree, f"{turn}-{index}", args.events, args.timeout,
                                **env)
                results[name].append(drained)
                print(f"{name}  {drained.rate:>9,.0f} ev/s  "
                      f"{drained.cpu_us_per_event()[0]:5.1f} µs CPU/event", flush=True)
    print(f"\nmedians over {args.rounds} turns of {args.events:,} events (logs: {workdir})")
    first = results[runs[0][0]]
    for name, drains in results.items():
        rate = statistics.median(d.rate for d in drains)
        cpu = statistics.median(d.cpu_us_per_event()[0] for d in drains)
        # Paired: each turn's ratio to the first run of the same turn (they ran minutes apart at
        # most), then the median: steadier than a ratio of medians while the box drifts.
        paired = statistics.median(d.cpu_us_per_event()[0] / f.cpu_us_per_event()[0]
                                   for d, f in zip(drains, first, strict=True))
        print(f"{name}  {rate:>9,.0f} ev/s  {cpu:5.1f} µs CPU/event  "
              f"({paired:.3f}× the first, median of the turns' ratios)")
    return 0


def dimensions_config(workdir: Path) -> Path:
    """The shipped funnel config with the workload's properties as dimensions."""
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    path = workdir / "funnel-dimensions.yaml"
    path.write_text(yaml.safe_dump({**shipped, "dimensions": {
        name: {"max_values": 20} for name in workload.PROPERTIES}}))
    return path


if __name__ == "__main__":
    sys.exit(main())
