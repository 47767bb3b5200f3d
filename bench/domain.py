"""``python -m bench.domain [TREE ...]``: CPU per event of the worker's domain step alone
(decode, state machine, contributions, folds, encode: ``DealProcessor.process``), in-process,
no broker, for one or several source trees taking turns.

The box drifts by up to ±50 % over a day and by ±30 % within seconds, so trees are only
compared within one run, at a fine grain: each tree gets its own long-lived subprocess that
imports the tree's own ``models``/``streams`` (its ``sys.path`` starts with the tree), and the
trees take turns pass by pass (A B, B A, …; a pass takes well under a second). Per tree the
median over the rounds is printed, with its ratio to the first tree and the median of the
per-round ratios. Every tree replays byte-identical events (encoded once, here) and must end
with identical folds (window sums included), stored deals (bytes and as read back), credits
and rejections: a digest of them is compared and a mismatch is an error (exit status 1).

Workloads (each pass starts from an empty store and a fresh processor; batches of ``--batch``):

- ``dataset``: the public CRM sales-opportunities dataset (``dataset_events``), deal by deal,
  as ``funnel-kpi replay`` sends it (few deals span two batches);
- ``simulator``: simulator traffic in send order (one property per event, deals spread over
  months, duplicates, late arrivals): most touches load and decode a stored deal.

CPU is ``time.process_time()`` around each ``process()`` call (store writes and record building
are left out), under the worker's GC settings (``gc.freeze()``, threshold 50,000). Every
``--scrape-every`` batches the window and period sums are read as a scrape reads them (untimed),
so the folds keep them up to date from then on, as in the worker.
``--profile FILE`` first writes a cProfile of one pass per tree and workload to
``FILE.<tree index>.<workload>`` (read it with ``pstats``).

Typical use::

    git worktree add /tmp/domain-base HEAD
    .venv/bin/python -m bench.domain /tmp/domain-base . \\
        --dataset /work/shared/datasets/crm-sales-opportunities
    git worktree remove /tmp/domain-base

(``--dataset`` defaults to ``shared/`` beside this checkout; each tree runs the processor API
it has: ``processors/`` or, before it, ``streams/worker/processor.py``.)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = ROOT.parent / "shared" / "datasets" / "crm-sales-opportunities"
WORKLOADS = ("dataset", "simulator")


# ---------------------------------------------------------------------------------------------
# Parent: build the workloads once, run the trees in turns.

def build_workloads(dataset: Path, copies: int, sim_deals: int, seed: int) -> dict[str, list]:
    """name → [(partition, key, event bytes)] in send order (this tree's generators); the key is
    the deal id, as producers must send it, and the partition one of 4 by the key."""
    import orjson

    from streams.tools.dataset import dataset_events
    from streams.tools.simulator import Simulation

    def encoded(events, partitions: int = 4) -> list[tuple[int, bytes, bytes]]:
        out = []
        for event in events:
            key = event["deal_id"].encode()
            digest = hashlib.blake2b(key, digest_size=4).digest()
            out.append((int.from_bytes(digest, "big") % partitions, key,
                        bytes(orjson.dumps(event))))
        return out

    return {
        "dataset": encoded(dataset_events(dataset, copies=copies)),
        "simulator": encoded(Simulation(seed=seed, deals=sim_deals, end=1_700_000_000).events()),
    }


class Child:
    """One tree's process: it imports that tree's code and runs passes on request, so turns of
    the trees can alternate every pass (a few tenths of a second) rather than every process."""

    def __init__(self, tree: Path, workload_file: Path, batch: int, scrape_every: int) -> None:
        self.tree = tree
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(tree),
             "--workload-file", str(workload_file), "--batch", str(batch),
             "--scrape-every", str(scrape_every)],
            cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask("ready")

    def ask(self, *command: str) -> dict:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(" ".join(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"{self.tree}: child died ({self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.domain",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", type=Path, default=[ROOT],
                        help="source trees to compare (default: this one)")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET,
                        help="folder of the CRM sales-opportunities CSVs")
    parser.add_argument("--copies", type=int, default=1, help="dataset copies (fresh deal ids)")
    parser.add_argument("--sim-deals", type=int, default=4000, help="simulated deals")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--rounds", type=int, default=15,
                        help="rounds; in each, every tree runs one pass of every workload")
    parser.add_argument("--batch", type=int, default=500, help="events per process() call")
    parser.add_argument("--scrape-every", type=int, default=10,
                        help="batches between two (untimed) scrapes of the window sums")
    parser.add_argument("--profile", type=Path, default=None,
                        help="before timing, write a cProfile of one pass per tree and workload "
                             "to PROFILE.<tree index>.<workload>")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    trees = [tree.resolve() for tree in args.trees]
    names = [w for w in args.workloads.split(",") if w]
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    workloads = {name: events for name, events in
                 build_workloads(args.dataset, args.copies, args.sim_deals, args.seed).items()
                 if name in names}
    sizes = ", ".join(f"{name} {len(events):,} events" for name, events in workloads.items())
    print(f"workloads: {sizes}; batches of {args.batch}; {args.rounds} rounds, trees "
          f"alternating every pass", flush=True)
    with tempfile.NamedTemporaryFile(prefix="domain-", suffix=".pickle", delete=False) as f:
        pickle.dump(workloads, f)
        workload_file = Path(f.name)
    children: list[Child] = []
    results: dict[str, list[list[dict]]] = {name: [[] for _ in trees] for name in workloads}
    try:
        children = [Child(tree, workload_file, args.batch, args.scrape_every) for tree in trees]
        if args.profile:
            for index, kid in enumerate(children):
                for name in workloads:
                    kid.ask("profile", name, f"{args.profile}.{index}.{name}")
        for turn in range(-1, args.rounds):  # round -1 warms every child up, not counted
            order = list(enumerate(children))
            if turn % 2:
                order.reverse()
            for name in workloads:
                cells = []
                for index, kid in order:
                    result = kid.ask("pass", name)
                    if turn >= 0:
                        results[name][index].append(result)
                    cells.append(f"[{index}] {result['us']:6.2f}")
                if turn >= 0:
                    print(f"round {turn + 1:>2}  {name:<9}  " + "  ".join(sorted(cells)),
                          flush=True)
    finally:
        for kid in children:
            kid.close()
        workload_file.unlink()

    print(f"\nmedian µs CPU per event over {args.rounds} rounds (ratio to [0]; "
          "ratio = median of the per-round ratios)")
    same = True
    for name, per_tree in results.items():
        base = statistics.median(r["us"] for r in per_tree[0])
        digests = {r["digest"] for turns in per_tree for r in turns}
        same = same and len(digests) == 1
        for index, turns in enumerate(per_tree):
            median = statistics.median(r["us"] for r in turns)
            paired = statistics.median(r["us"] / r0["us"] for r, r0 in zip(turns, per_tree[0],
                                                                             strict=True))
            print(f"{name:<9}  [{index}] {trees[index]}  {median:6.2f} µs  "
                  f"{median / base:.3f}× (paired {paired:.3f}×)")
    print("outputs (folds, writes, credits): " + ("identical in every tree and pass" if same
          else "DIFFER between trees or passes"))
    return 0 if same else 1


# ---------------------------------------------------------------------------------------------
# Child: one tree; answers "pass WORKLOAD" and "profile WORKLOAD FILE" with one JSON line.

def child(args: argparse.Namespace) -> int:
    tree = args.child.resolve()
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(tree)] + [p for p in sys.path if p not in (here, "", str(tree))]
    from models import aggregates

    if not Path(aggregates.__file__).resolve().is_relative_to(tree):
        raise SystemExit(f"imported {aggregates.__file__}, not from {tree}")
    with args.workload_file.open("rb") as f:
        batches = {name: _batches(events, args.batch) for name, events in pickle.load(f).items()}
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "pass":
            cpu, n, digest = _pass(batches[rest[0]], args.scrape_every)
            answer = {"us": cpu / n * 1e6, "digest": digest}
        elif command == "profile":
            import cProfile

            profiler = cProfile.Profile()
            _pass(batches[rest[0]], args.scrape_every, profiler)
            profiler.dump_stats(rest[1])
            answer = {}
        else:
            answer = {}
        print(json.dumps(answer), flush=True)
    return 0


def _batches(events: list[tuple[int, bytes]], size: int) -> list[list]:
    """The records of each process() call (built once: not the domain step's work). Like the
    worker's fetches, a batch mixes the partitions (4, by deal id)."""
    Record = _processor_api()[2]

    records = [Record(key, raw, "crm.events", partition, offset, None)
               for offset, (partition, key, raw) in enumerate(events)]
    return [records[start:start + size] for start in range(0, len(records), size)]


def _processor_api() -> tuple[type, type, type]:
    """(DealProcessor, EventClock, Record) wherever the tree keeps them."""
    try:
        from processors.clock import EventClock
        from processors.deals import DealProcessor
        from processors.records import Record
    except ImportError:  # trees before processors/ (up to 9ebb3dc)
        from streams.worker.processor import DealProcessor, EventClock, Record
    return DealProcessor, EventClock, Record


def _scrape(proc, config) -> None:
    """What a /metrics scrape and a tick ask of the folds (untimed): the hourly families' window
    and period sums, which the folds then keep up to date as deals change."""
    from models import aggregates as agg
    from models.periods import PERIODS, period_bounds

    try:
        from models.hourly import hourly_totals
    except ImportError:  # a tree from before models/hourly.py
        hourly_totals = agg.hourly_totals
    now_ms = proc.clock.now_ms()
    now_hour = now_ms // agg.HOUR_MS
    folds = list(proc.folds.folds.values())
    ranges = agg.window_ranges(now_hour)
    for family in (agg.REACHED_W, agg.CLOSED_W, agg.WON_REVENUE_W, agg.TIME_TO_CLOSE_W):
        hourly_totals(folds, family, ranges, now_hour)
    fiscal = getattr(config, "fiscal_year_start_month", 1)  # trees before the fiscal year
    periods = tuple((period, period_bounds(now_ms, config.zone, period, *([fiscal] if fiscal != 1 else []))[0]
                     // agg.HOUR_MS) for period in PERIODS)
    hourly_totals(folds, agg.WON_REVENUE_W, periods, now_hour)


def _pass(batches: list[list], scrape_every: int, profiler=None) -> tuple[float, int, str]:
    """One replay from an empty store: (CPU seconds in process(), events, output digest)."""
    from models.config import Clock, load_config

    DealProcessor, EventClock, _ = _processor_api()
    config = load_config()
    extra = []
    if "metrics" in inspect.signature(DealProcessor).parameters:  # before processors/ (9ebb3dc)
        from prometheus_client import CollectorRegistry

        from sinks.prometheus import ProcessMetrics

        extra.append(ProcessMetrics(CollectorRegistry()))
    proc = DealProcessor(config, EventClock(Clock.STREAM), *extra, max_skew_ms=86_400_000)
    store: dict[str, bytes] = {}
    load = lambda key, record=None: store.get(key)  # noqa: E731
    outputs = hashlib.sha256()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)  # the worker's settings (streams/tools/commands.py)
    cpu = 0.0
    n = 0
    clock = time.process_time
    if profiler is not None:
        profiler.enable()
    for number, records in enumerate(batches, 1):
        start = clock()
        result = proc.process(records, load)
        cpu += clock() - start
        if number % scrape_every == 0:
            _scrape(proc, config)
        n += len(records)
        for deal_id, value, _ in result.writes:
            store[deal_id] = value
        outputs.update(repr([(c.account, c.deal_id, c.pipeline, c.currency, c.micro)
                             for c in result.credits]).encode())
        outputs.update(repr([(r.code, r.record.offset) for r in result.rejections]).encode())
    if profiler is not None:
        profiler.disable()
    gc.unfreeze()
    # Stored deals byte for byte and as read back; folds as snapshots.
    try:
        from models.deal_codec import decode_deal
    except ImportError:  # a tree from before models/deal_codec.py
        from models.deal import decode_deal
    for deal_id in sorted(store):
        outputs.update(repr((deal_id, store[deal_id], decode_deal(store[deal_id]))).encode())
    for partition in sorted(proc.folds.folds):
        fold = proc.folds.folds[partition]
        outputs.update(repr((partition, _sorted(fold.snapshot()))).encode())
        for family, views in sorted(fold.hourly.items()):  # the window sums scrapes read
            for names, sums in sorted(views.items()):
                outputs.update(repr((family, names, sums.now_hour, _sorted(sums.sums))).encode())
    return cpu, n, outputs.hexdigest()[:16]


def _sorted(value: object) -> object:
    if isinstance(value, dict):
        return sorted((repr(k), _sorted(v)) for k, v in value.items())
    if hasattr(value, "counts"):  # a histogram
        return (list(value.counts), value.count, value.total)  # type: ignore[attr-defined]
    return value


if __name__ == "__main__":
    sys.exit(main())
