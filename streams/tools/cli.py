"""``funnel-kpi``: broker, worker, replay, simulate, demo, ingest, adapt, backfill, salesforce-cdc,
check-config.

Every setting is a ``FUNNEL_*`` environment variable and a flag of the same name (flags win),
except secrets: environment or ``FUNNEL_<NAME>_FILE`` only, as a command line shows in ``ps``.
A start-up failure is one line ``funnel-kpi: ...`` and exit code 2 (:mod:`streams.kafka.startup`).
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
from typing import NoReturn

from models.config import ConfigError
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError, add_setting_flag, is_secret, load_settings
from streams.version import VERSION

DATASET_FILES = ("sales_pipeline.csv", "products.csv")
WORKER_SETTINGS = [name for name in Settings.model_fields if not is_secret(Settings, name)]


class Parser(argparse.ArgumentParser):
    """A usage error is one line too (the cause, then where the fix is), exit code 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("funnel-kpi").strip()
        self.exit(2, f"funnel-kpi: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def _add_settings(parser: argparse.ArgumentParser, names: list[str]) -> None:
    group = parser.add_argument_group(
        "settings (flag or environment variable; secrets: environment or FUNNEL_<NAME>_FILE only)")
    for name in names:
        add_setting_flag(group, Settings, name)


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        name: value for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    return load_settings(Settings, **overrides)


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

    from models.config import load_config
    from streams.kafka import topics
    from streams.worker.app import FunnelWorker

    load_config(settings.config)  # fail fast, before touching the broker
    asyncio.run(topics.ensure_topics(
        settings.broker, topics.worker_topics(settings.app_id, settings.partitions),
        replication_factor=settings.replication_factor, app_id=settings.app_id,
    ))
    # uvloop: with asyncio's own loop, selector, callbacks and transports took ~12 % of the
    # worker's CPU (bench/PROFILE.md).
    asyncio.set_event_loop(uvloop.new_event_loop())
    worker = FunnelWorker(settings)
    # The hot path allocates many short-lived tuples; collecting the young generation less
    # often saves ~5 % CPU, and everything built at start-up is moved out of the GC's way.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    faust.Worker(worker.app, loglevel=settings.log_level.upper(), quiet=True,
                 override_logging=False).execute_from_commandline()
    return 0


def _replay_events(path: Path, copies: int):
    from streams.tools.dataset import dataset_events

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
            return list(dataset_events(folder, copies=copies))
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
    from streams.tools.producer import produce

    settings = _settings(args)
    events = _replay_events(Path(args.file), args.copies)
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
    from streams.crm.sources.settings import from_args
    from streams.http.ingest import run_ingest

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return _serve(run_ingest, settings, from_args(args))


def cmd_adapt(args: argparse.Namespace) -> int:
    from streams.crm.adapt import run_adapt
    from streams.crm.sources.settings import from_args

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return _serve(run_adapt, settings, from_args(args))


def cmd_salesforce_cdc(args: argparse.Namespace) -> int:
    from streams.crm.pubsub.settings import from_args
    from streams.crm.pubsub.subscriber import run_cdc

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return _serve(run_cdc, settings, from_args(args))


def cmd_check_config(args: argparse.Namespace) -> int:
    from streams.tools.check_config import run

    _configure_logging("WARNING")
    return run(_settings(args))


def cmd_backfill(args: argparse.Namespace) -> int:
    from streams.crm.backfill.runner import run

    settings = _settings(args)
    _configure_logging(settings.log_level)
    return run(args, settings)


def parser() -> argparse.ArgumentParser:
    root = Parser(
        prog="funnel-kpi", description="Real-time sales-funnel KPIs from CRM change events.",
    )
    root.add_argument("--version", action="version", version=f"funnel-kpi {VERSION}")
    sub = root.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu)")
    broker.add_argument("--port", type=int, default=9092, help="loopback port (default 9092)")
    broker.set_defaults(run=cmd_broker)

    worker = sub.add_parser("worker", help="run a stream worker (Faust) against FUNNEL_BROKER")
    _add_settings(worker, WORKER_SETTINGS)
    worker.set_defaults(run=cmd_worker)

    producer_settings = ["broker", "partitions", "replication_factor"]
    replay = sub.add_parser("replay", help="send a JSON-lines file of events or the dataset CSV")
    replay.add_argument("file", help="events.jsonl, or sales_pipeline.csv / its folder")
    replay.add_argument("--rate", type=float, default=0.0, help="events/s (default: as fast as possible)")
    replay.add_argument("--copies", type=int, default=1, help="dataset only: replay N times under fresh ids")
    _add_settings(replay, producer_settings)
    replay.set_defaults(run=cmd_replay)

    simulate = sub.add_parser("simulate", help="send realistic synthetic CRM traffic")
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--deals", type=int, default=2000, help="deals to simulate")
    simulate.add_argument("--days", type=int, default=120, help="history length ending now")
    simulate.add_argument("--rate", type=float, default=500.0, help="events/s (0 = unpaced)")
    _add_settings(simulate, producer_settings)
    simulate.set_defaults(run=cmd_simulate)

    erase = sub.add_parser("erase", help="erase a person (owner or account) from state and KPIs")
    erase.add_argument("name", help="the owner or account value to erase, exactly as sent")
    _add_settings(erase, ["broker"])
    erase.set_defaults(run=cmd_erase)

    demo = sub.add_parser("demo", help="broker + worker + simulator with a live KPI table")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--deals", type=int, default=3000,
                      help="deals created over the simulated 120 days (90 seeded at once, 30 live)")
    demo.add_argument("--rate", type=float, default=20.0,
                      help="events/s of the live part, after the seeded quarter")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    _add_settings(demo, ["web_port", "config"])
    demo.set_defaults(run=cmd_demo)

    from streams.crm.sources.settings import ADAPT_SETTINGS, INGEST_SETTINGS, add_flags

    ingest = sub.add_parser(
        "ingest", help="HTTP receiver for HubSpot and Pipedrive webhooks → crm.raw.<source>",
        description="Secrets come from the environment only: FUNNEL_HUBSPOT_CLIENT_SECRET, "
        "FUNNEL_PIPEDRIVE_BASIC_AUTH (user:password); a source without one answers 404.",
    )
    _add_settings(ingest, ["broker", "partitions", "replication_factor", "log_level"])
    add_flags(ingest, INGEST_SETTINGS)
    ingest.set_defaults(run=cmd_ingest)

    adapt = sub.add_parser("adapt", help="raw CRM topics (webhooks, Salesforce CDC, Debezium) → crm.events")
    _add_settings(adapt, ["broker", "partitions", "replication_factor", "config", "app_id",
                          "session_timeout", "web_bind", "log_level"])
    add_flags(adapt, ADAPT_SETTINGS)
    adapt.set_defaults(run=cmd_adapt)

    from streams.crm.backfill.runner import add_arguments

    backfill = sub.add_parser(
        "backfill", help="read a CRM's deals and their history through its API → crm.events",
        description="Credentials come from the environment only: FUNNEL_HUBSPOT_ACCESS_TOKEN, "
        "FUNNEL_PIPEDRIVE_API_TOKEN, FUNNEL_SALESFORCE_ACCESS_TOKEN, or the same names with _FILE.",
    )
    add_arguments(backfill)
    _add_settings(backfill, ["broker", "partitions", "replication_factor", "config", "log_level"])
    backfill.set_defaults(run=cmd_backfill)

    from streams.crm.pubsub.settings import add_flags as add_cdc_flags

    cdc = sub.add_parser(
        "salesforce-cdc", help="Salesforce Change Data Capture (Pub/Sub API) → crm.raw.salesforce",
        description="Secrets come from the environment only: FUNNEL_SALESFORCE_PRIVATE_KEY (jwt) or "
        "FUNNEL_SALESFORCE_CLIENT_SECRET (client_credentials), or the same names with _FILE.",
    )
    _add_settings(cdc, ["broker", "partitions", "replication_factor", "web_bind", "log_level"])
    add_cdc_flags(cdc)
    cdc.set_defaults(run=cmd_salesforce_cdc)

    check = sub.add_parser(
        "check-config", help="check every setting, the funnel config, Kafka, Redis and CRM tokens",
        description="What an operator runs before a deploy: loads every setting and the funnel "
        "config, logs in to Kafka and inspects the worker's topics, pings Redis when "
        "FUNNEL_REDIS_URL is set and calls each CRM whose token is set. Creates nothing. Exit 0, "
        "or 2 with one line on standard error naming the problems.",
    )
    _add_settings(check, WORKER_SETTINGS)
    check.set_defaults(run=cmd_check_config)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except StartupError as exc:
        return _refuse(str(exc))
    except ConfigError as exc:
        return _refuse(f"config error: {exc} (FUNNEL_CONFIG)")
    except KeyboardInterrupt:
        return 130


def _refuse(message: str) -> int:
    """One line on stderr (YAML errors span lines), exit code 2."""
    print("funnel-kpi: " + " ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
