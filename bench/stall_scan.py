"""Cost of the stall scan over 1M open deals (leaks issue): the batch loop's timed stall check
(``processors.stalls.crossed_stalls``) and the scrape-time stall/forecast gauges, measured on a
fold of synthetic open deals.

Run: ``.venv/bin/python -m bench.stall_scan [--deals 1000000]``.
"""

from __future__ import annotations

import argparse
import random
import time

from prometheus_client import CollectorRegistry, generate_latest

from models import aggregates as agg
from models.config import load_config
from models.fold import Fold
from processors.stalls import crossed_stalls
from sinks.prometheus import KpiCollector

DAY = agg.DAY_MS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deals", type=int, default=1_000_000)
    args = parser.parse_args()
    config = load_config()
    rng = random.Random(1)
    now = 1_700_000_000_000
    stages = [s.name for s in config.pipelines["default"].open_stages]
    fold = Fold()
    for i in range(args.deals):
        entered = now - rng.randrange(60 * DAY)
        stalled = now - entered > 30 * DAY  # steady state: stalled deals were alerted already
        key = ("default", rng.choice(stages), "USD", entered, f"deal-{i}", stalled, None, "pipeline")
        fold.apply(((agg.OPEN_DEALS, key, 1_000 * agg.MICRO),), 1)
    started = time.perf_counter()
    crossed_stalls(fold, config, now, 200)
    tick = time.perf_counter() - started
    registry = CollectorRegistry()
    registry.register(KpiCollector(config, lambda: [fold], lambda: now, "bench"))
    started = time.perf_counter()
    generate_latest(registry)
    scrape = time.perf_counter() - started
    print(f"stall scan (tick) over {args.deals:,} open deals: {tick:.3f} s")
    print(f"/metrics render incl. stall and forecast gauges over {args.deals:,} open deals: {scrape:.3f} s")


if __name__ == "__main__":
    main()
