"""``funnel-kpi check-config``: what an operator runs before a deploy.

It loads every setting and the funnel config the way the commands do, then asks what they point
at: the Kafka cluster (login, the worker's topics, their partition counts and configs), Redis
when ``FUNNEL_REDIS_URL`` is set, and each CRM whose API token is set. One line per check on
standard output (``ok``, ``warn``, ``FAIL`` or ``skip``); with any ``FAIL`` one line on standard
error names the problems and the exit code is 2. Nothing is created or written.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from models.config import ConfigError, load_config
from models.rates import reporting_book
from streams.crm.backfill.settings import BackfillSettings
from streams.kafka import topics
from streams.kafka.broker_check import check_broker
from streams.kafka.client import KafkaSecurity, client_args, load_security
from streams.kafka.settings import Settings
from streams.kafka.startup import StartupError, load_settings

CRM_TOKENS = {"hubspot": "hubspot_access_token", "pipedrive": "pipedrive_api_token",
              "salesforce": "salesforce_access_token"}


@dataclass
class Report:
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, level: str, text: str) -> None:
        text = " ".join(text.split())  # a YAML or HTTP error may span lines: one line each
        self.lines.append((level, text))
        print(f"{level:5} {text}", flush=True)

    @property
    def failures(self) -> list[str]:
        return [text for level, text in self.lines if level == "FAIL"]


def _check(report: Report, what: str, run: Callable[[], str]) -> None:
    """``run()`` says what it found (ok), or raises with what is wrong (FAIL)."""
    try:
        report.add("ok", f"{what}: {run()}")
    except Exception as exc:  # a check reports what went wrong, whatever the client raised
        report.add("FAIL", f"{what}: {_reason(exc)}")


def _reason(exc: BaseException) -> str:
    """Our own errors say what to fix; anyone else's is named by its type."""
    if isinstance(exc, StartupError | ConfigError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _describe_settings(settings: Settings) -> str:
    return (f"app id {settings.app_id}, {settings.partitions} partitions, replication factor "
            f"{settings.replication_factor}, store {settings.store}, clock "
            f"{settings.clock or 'from the funnel config'}, web {settings.web_bind}:{settings.web_port}")


def _describe_config(settings: Settings) -> str:
    config = load_config(settings.config)
    pipelines = ", ".join(f"{name} ({len(p.stages)} stages)" for name, p in config.pipelines.items())
    return (f"{settings.config or 'the shipped models/funnel.yaml'}: pipelines {pipelines}; sources "
            f"{', '.join(sorted(config.sources))}; {len(config.owners)} owners named; targets for "
            f"{', '.join(sorted(config.targets)) or 'no pipeline'}; timezone {config.zone}")


def _check_rates(report: Report, settings: Settings) -> None:
    """The rates file loads as the worker loads it (a bad row names file:line)."""
    try:
        config = load_config(settings.config)
    except ConfigError:
        return  # the funnel config check said why
    if not config.reporting_currency:
        report.add("skip", "rates: the funnel config names no reporting_currency")
        return

    def describe() -> str:
        book = reporting_book(config, settings.config)
        found = ", ".join(book.table.currencies) or "none"
        return (f"reporting currency {config.reporting_currency}; file "
                f"{config.rates.file or 'none'} (currencies: {found}); topic "
                f"{config.rates.topic or 'none'}")
    _check(report, "rates", describe)


async def _check_kafka(report: Report, settings: Settings, security: KafkaSecurity) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    auth = security.security_protocol + (f"/{security.sasl_mechanism}" if security.sasl else "")
    await check_broker(settings.broker, security)
    report.add("ok", f"Kafka at {settings.broker} ({auth}): logged in")
    wanted = topics.worker_topics(settings.app_id, settings.partitions)
    admin = AIOKafkaAdminClient(**client_args(settings.broker, security))
    await admin.start()
    try:
        counts, configs = await topics.describe(admin, wanted)
    finally:
        await admin.close()
    missing = sorted(set(wanted) - set(counts))
    for name, partitions in sorted(wanted.items()):
        if name in counts and counts[name] != partitions:
            report.add("FAIL", f"topic {name!r} has {counts[name]} partitions, FUNNEL_PARTITIONS wants "
                               f"{partitions}: use a new FUNNEL_APP_ID or FUNNEL_PARTITIONS={counts[name]}")
        wanted_configs = topics.topic_configs(name, settings.app_id)
        for risk in [*topics.data_loss_risks(name, wanted_configs, configs.get(name, {})),
                     *topics.timestamp_risks(name, wanted_configs, configs.get(name, {}))]:
            report.add("warn", risk)
    report.add("ok", f"topics: {len(wanted) - len(missing)} of the worker's {len(wanted)} present"
               + (f"; the worker creates {', '.join(missing)} at start" if missing else ""))


async def _check_redis(url: str) -> str:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    try:
        await client.ping()
        return f"answers PING (server {(await client.info('server')).get('redis_version', '?')})"
    finally:
        await client.aclose()


def _check_crm(crm: str, settings: Settings, backfill: BackfillSettings) -> str:
    from streams.crm.backfill.runner import READERS
    from streams.crm.sources.settings import SourceSettings, context

    reader = READERS[crm](backfill, context(settings, SourceSettings()))
    stages = reader.stages()
    return f"the API accepts the token: {len(stages)} deal stages, {len(reader.owners())} owners"


def run(settings: Settings) -> int:
    """Every check, in order; 0 when none failed, else 2 (one line on standard error)."""
    report = Report()
    _check(report, "settings", lambda: _describe_settings(settings))
    _check(report, "funnel config", lambda: _describe_config(settings))
    _check_rates(report, settings)

    def sources() -> str:
        from streams.crm.sources.settings import SourceSettings

        return f"raw topics {', '.join(sorted(SourceSettings().raw_topics))}"

    _check(report, "webhook and adapter settings", sources)
    try:
        security = load_security()
    except StartupError as exc:
        report.add("FAIL", f"Kafka client settings: {exc}")
    else:
        report.add("ok", f"Kafka client settings: {security.security_protocol}")
        try:
            asyncio.run(asyncio.wait_for(_check_kafka(report, settings, security),
                                         security.connect_timeout + 30))
        except Exception as exc:  # a refused login, an admin request the broker refused
            report.add("FAIL", f"Kafka at {settings.broker}: {_reason(exc)}")
    if settings.redis_url is None:
        report.add("skip", "Redis: FUNNEL_REDIS_URL is not set (the Redis output is off)")
    else:
        url = settings.redis_url.get_secret_value()
        _check(report, "Redis", lambda: asyncio.run(_check_redis(url)))
    _check_crms(report, settings)
    if report.failures:
        print(f"funnel-kpi: check-config found {len(report.failures)} problem"
              f"{'s' if len(report.failures) > 1 else ''}: {report.failures[0]}"
              + (" (and more above)" if len(report.failures) > 1 else ""), file=sys.stderr)
        return 2
    print("all checks passed")
    return 0


def _check_crms(report: Report, settings: Settings) -> None:
    try:
        backfill = load_settings(BackfillSettings)
    except StartupError as exc:
        report.add("FAIL", f"CRM API settings: {exc}")
        return
    for crm, token in CRM_TOKENS.items():
        if getattr(backfill, token) is None and getattr(backfill, f"{token}_file") is None:
            report.add("skip", f"{crm}: FUNNEL_{token.upper()}(_FILE) is not set")
        else:
            _check(report, crm, lambda crm=crm: _check_crm(crm, settings, backfill))
