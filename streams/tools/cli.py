"""``funnel-kpi``: broker, worker, replay, simulate, demo, ingest, adapt, backfill, salesforce-cdc,
check-config.

Every setting is a ``FUNNEL_*`` environment variable and a flag of the same name (flags win),
except secrets: environment or ``FUNNEL_<NAME>_FILE`` only, as a command line shows in ``ps``.
A start-up failure is one line ``funnel-kpi: ...`` and exit code 2 (:mod:`streams.kafka.startup`).

This module declares the commands, their flags and help, and turns a refusal into that line;
what each command does is :mod:`streams.tools.commands`.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from models.config import ConfigError
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError, add_setting_flags, is_secret
from streams.tools import commands
from streams.version import VERSION

SOURCE_FLAGS = "source settings (flag or environment variable)"
WORKER_SETTINGS = [name for name in Settings.model_fields if not is_secret(Settings, name)]


class Parser(argparse.ArgumentParser):
    """A usage error is one line too (the cause, then where the fix is), exit code 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("funnel-kpi").strip()
        self.exit(2, f"funnel-kpi: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def _add_settings(parser: argparse.ArgumentParser, names: list[str]) -> None:
    add_setting_flags(parser, Settings, names, "settings (flag or environment variable; secrets: "
                      "environment or FUNNEL_<NAME>_FILE only)")


def parser() -> argparse.ArgumentParser:
    root = Parser(
        prog="funnel-kpi", description="Real-time sales-funnel KPIs from CRM change events.",
    )
    root.add_argument("--version", action="version", version=f"funnel-kpi {VERSION}")
    sub = root.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu)")
    broker.add_argument("--port", type=int, default=9092, help="loopback port (default 9092)")
    broker.set_defaults(run=commands.cmd_broker)

    worker = sub.add_parser("worker", help="run a stream worker (Faust) against FUNNEL_BROKER")
    _add_settings(worker, WORKER_SETTINGS)
    worker.set_defaults(run=commands.cmd_worker)

    producer_settings = ["broker", "partitions", "replication_factor"]
    replay = sub.add_parser("replay", help="send a JSON-lines file of events or the dataset CSV")
    replay.add_argument("file", help="events.jsonl, or sales_pipeline.csv / its folder")
    replay.add_argument("--rate", type=float, default=0.0, help="events/s (default: as fast as possible)")
    replay.add_argument("--copies", type=int, default=1, help="dataset only: replay N times under fresh ids")
    _add_settings(replay, producer_settings)
    replay.set_defaults(run=commands.cmd_replay)

    simulate = sub.add_parser("simulate", help="send realistic synthetic CRM traffic")
    simulate.add_argument("--seed", type=int, default=7)
    simulate.add_argument("--deals", type=int, default=2000, help="deals to simulate")
    simulate.add_argument("--days", type=int, default=120, help="history length ending now")
    simulate.add_argument("--rate", type=float, default=500.0, help="events/s (0 = unpaced)")
    _add_settings(simulate, producer_settings)
    simulate.set_defaults(run=commands.cmd_simulate)

    erase = sub.add_parser("erase", help="erase a person (owner or account) from state and KPIs")
    erase.add_argument("name", help="the owner or account value to erase, exactly as sent")
    _add_settings(erase, ["broker"])
    erase.set_defaults(run=commands.cmd_erase)

    demo = sub.add_parser("demo", help="broker + worker + simulator with a live KPI table")
    demo.add_argument("--seed", type=int, default=7)
    demo.add_argument("--deals", type=int, default=3000,
                      help="deals created over the simulated 120 days (90 seeded at once, 30 live)")
    demo.add_argument("--rate", type=float, default=20.0,
                      help="events/s of the live part, after the seeded quarter")
    demo.add_argument("--duration", type=float, default=None,
                      help="stop after this many seconds (default: run until Ctrl-C)")
    _add_settings(demo, ["web_port", "config"])
    demo.set_defaults(run=commands.cmd_demo)

    from streams.crm.sources.settings import ADAPT_SETTINGS, INGEST_SETTINGS, SourceSettings

    ingest = sub.add_parser(
        "ingest", help="HTTP receiver for HubSpot and Pipedrive webhooks → crm.raw.<source>",
        description="Secrets come from the environment only: FUNNEL_HUBSPOT_CLIENT_SECRET, "
        "FUNNEL_PIPEDRIVE_BASIC_AUTH (user:password); a source without one answers 404.",
    )
    _add_settings(ingest, ["broker", "partitions", "replication_factor", "log_level"])
    add_setting_flags(ingest, SourceSettings, INGEST_SETTINGS, SOURCE_FLAGS)
    ingest.set_defaults(run=commands.cmd_ingest)

    adapt = sub.add_parser("adapt", help="raw CRM topics (webhooks, Salesforce CDC, Debezium) → crm.events")
    _add_settings(adapt, ["broker", "partitions", "replication_factor", "config", "app_id",
                          "session_timeout", "web_bind", "log_level"])
    add_setting_flags(adapt, SourceSettings, ADAPT_SETTINGS, SOURCE_FLAGS)
    adapt.set_defaults(run=commands.cmd_adapt)

    from streams.crm.backfill.runner import add_arguments

    backfill = sub.add_parser(
        "backfill", help="read a CRM's deals and their history through its API → crm.events",
        description="Credentials come from the environment only: FUNNEL_HUBSPOT_ACCESS_TOKEN, "
        "FUNNEL_PIPEDRIVE_API_TOKEN, FUNNEL_SALESFORCE_ACCESS_TOKEN, or the same names with _FILE.",
    )
    add_arguments(backfill)
    _add_settings(backfill, ["broker", "partitions", "replication_factor", "config", "log_level"])
    backfill.set_defaults(run=commands.cmd_backfill)

    from streams.crm.pubsub.settings import FLAGS as CDC_FLAGS
    from streams.crm.pubsub.settings import CdcSettings

    cdc = sub.add_parser(
        "salesforce-cdc", help="Salesforce Change Data Capture (Pub/Sub API) → crm.raw.salesforce",
        description="Secrets come from the environment only: FUNNEL_SALESFORCE_PRIVATE_KEY (jwt) or "
        "FUNNEL_SALESFORCE_CLIENT_SECRET (client_credentials), or the same names with _FILE.",
    )
    _add_settings(cdc, ["broker", "partitions", "replication_factor", "web_bind", "log_level"])
    add_setting_flags(cdc, CdcSettings, CDC_FLAGS, "Salesforce settings (flag or environment variable; "
                      "secrets: environment or FUNNEL_<NAME>_FILE only)")
    cdc.set_defaults(run=commands.cmd_salesforce_cdc)

    check = sub.add_parser(
        "check-config", help="check every setting, the funnel config, Kafka, Redis and CRM tokens",
        description="What an operator runs before a deploy: loads every setting and the funnel "
        "config, logs in to Kafka and inspects the worker's topics, pings Redis when "
        "FUNNEL_REDIS_URL is set and calls each CRM whose token is set. Creates nothing. Exit 0, "
        "or 2 with one line on standard error naming the problems.",
    )
    _add_settings(check, WORKER_SETTINGS)
    check.set_defaults(run=commands.cmd_check_config)
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
