"""What each ``funnel-kpi`` command does once :mod:`streams.tools.cli` parsed its arguments.

Kept apart from the parser, which only declares commands, flags and help: here each command
loads its settings (flags over environment), sets up logging and runs its service, importing
what it needs (Faust, aiohttp, gRPC) only when it is the command that runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
import time
from pathlib import Path

from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError, from_flags

DATASET_FILES = ("sales_pipeline.csv", "products.csv")


def _settings(args: argparse.Namespace) -> Settings:
    return from_flags(Settings, args)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def cmd_broker(args: argparse.Namespace) -> int:
    from streams.tools.broker import EmbeddedBroker

    broker = EmbeddedBroker(port=args.port).start()
    print(f"broker listening on {broker.url} (memory storage: topics vanish on stop)", flush=True)
    stop = {"now": False}

    def _stop(*_: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        while not stop["now"] and broker.process and broker.process.poll() is None:
            time.sleep(0.2)
    finally:
        broker.stop()
    print("broker stopped", flush=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _configure_logging(settings.log_level)

    import faust
    import uvloop

    from streams.kafka import topics
    from streams.worker.app import FunnelWorker, load_funnel

    funnel = load_funnel(settings)  # fail fast, before the broker
    asyncio.run(topics.ensure_topics(
        settings.broker, topics.worker_topics(settings.app_id, settings.partitions),
        replication_factor=settings.replication_factor, app_id=settings.app_id,
    ))
    # uvloop: with asyncio's own loop, selector, callbacks and transports took ~12 % of the
    # worker's CPU (bench/PROFILE.md).
    asyncio.set_event_loop(uvloop.new_event_loop())
    worker = FunnelWorker(settings, funnel)
    # The hot path allocates many short-lived tuples; collecting the young generation less
    # often saves ~5 % CPU, and everything built at start-up is moved out of the GC's way.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    faust.Worker(worker.app, loglevel=settings.log_level.upper(), quiet=True,
                 override_logging=False).execute_from_commandline()
    return 0


def _replay_events(path: Path, copies: int, dimensions: dict[str, str]):
    """The events of a JSON-lines file, or of the dataset's folder (``dimensions``: the funnel
    config's dataset columns, which become the deals' properties)."""
    from streams.tools.dataset import check_columns, dataset_events

    if not path.exists():
        raise StartupError(f"replay: {path}: no such file; give an events file (JSON lines), or the "
                           "dataset's sales_pipeline.csv or its folder")
    if path.is_dir() or path.suffix == ".csv":
        folder = path if path.is_dir() else path.parent
        missing = [name for name in DATASET_FILES if not (folder / name).is_file()]
        if missing:
            raise StartupError(f"replay: {folder} has no {' and no '.join(missing)}; give the folder of "
                               f"the CRM sales-opportunities dataset ({' with '.join(DATASET_FILES)})")
        try:
            check_columns(dimensions)
        except ValueError as exc:
            raise StartupError(f"replay: funnel config: {exc}; fix dimensions.<name>.sources.csv") from None
        try:
            return list(dataset_events(folder, copies=copies, dimensions=dimensions))
        except (OSError, UnicodeDecodeError, KeyError, ValueError) as exc:
            raise StartupError(f"replay: {folder} is not the CRM sales-opportunities dataset "
                               f"({type(exc).__name__}: {exc}); give that dataset's folder") from None
    events = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        events.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise StartupError(f"replay: {path}:{number}: not JSON ({exc}); the file must "
                                           "hold one JSON event per line") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"replay: cannot read {path} ({getattr(exc, 'strerror', None) or exc}); "
                           "give a readable UTF-8 events file") from None
    return events


def cmd_replay(args: argparse.Namespace) -> int:
    from models.config import load_config
    from streams.tools.producer import produce

    settings = _settings(args)
    dimensions = load_config(settings.config).dimension_sources("csv")
    events = _replay_events(Path(args.file), args.copies, dimensions)
    summary = asyncio.run(produce(settings, events, rate=args.rate, total=len(events)))
    print(summary.line())
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from streams.tools.producer import produce
    from streams.tools.simulator import Simulation

    settings = _settings(args)
    simulation = Simulation(seed=args.seed, deals=args.deals, days=args.days)
    events = list(simulation.events())
    summary = asyncio.run(produce(settings, events, rate=args.rate, total=len(events)))
    print(summary.line())
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from streams.tools.erase import request_erasure

    if not args.name.strip():
        raise StartupError("erase: the name is empty; give the owner or account value to erase, "
                           "exactly as the events carry it")
    pseudonym = asyncio.run(request_erasure(_settings(args), args.name))
    print(f"erasure requested on {topics.ERASURES}: every worker replaces the name by {pseudonym} "
          "in state, KPIs and every later event, also in a rebuild")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.tools.demo import run_demo

    return run_demo(_settings(args), seed=args.seed, rate=args.rate, deals=args.deals,
                    duration=args.duration)


def _serve(run, *args) -> int:
    """Run a long-lived async service until SIGTERM or Ctrl-C."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run(*args, stop)

    asyncio.run(main())
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from streams.crm.sources.settings import SourceSettings
    from streams.http.ingest import run_ingest

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return _serve(run_ingest, settings, from_flags(SourceSettings, args))


def cmd_adapt(args: argparse.Namespace) -> int:
    from streams.crm.adapt import run_adapt
    from streams.crm.sources.settings import SourceSettings

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return _serve(run_adapt, settings, from_flags(SourceSettings, args))


def cmd_salesforce_cdc(args: argparse.Namespace) -> int:
    from streams.crm.pubsub.settings import CdcSettings
    from streams.crm.pubsub.subscriber import run_cdc

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return _serve(run_cdc, settings, from_flags(CdcSettings, args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from streams.tools.check_config import run

    _configure_logging("WARNING")
    return run(_settings(args))


def cmd_backfill(args: argparse.Namespace) -> int:
    from streams.crm.backfill.runner import run

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return run(args, settings)
