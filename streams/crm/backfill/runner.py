"""``funnel-kpi backfill CRM``: page through the CRM, produce, acknowledge, checkpoint.

A page's events are all acknowledged by the broker (acks=all) before the checkpoint moves past
the page, so a run stopped anywhere resumes at the first page not wholly acknowledged; what it
sends again has the same event ids, so the deal agent counts it as a duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from models.event import encode_event
from streams.crm.backfill import hubspot, pipedrive, salesforce
from streams.crm.backfill.common import CrmStage, Page, limit_history
from streams.crm.backfill.http import Api, ApiError
from streams.crm.backfill.settings import FLAGS, BackfillSettings
from streams.crm.backfill.stage_map import render
from streams.crm.sources.common import Malformed, from_iso
from streams.crm.sources.settings import SourceSettings, context
from streams.kafka import topics
from streams.kafka.settings import Settings
from streams.kafka.startup import add_setting_flag, load_settings
from streams.tools.producer import ensure_event_topics, start_producer

log = logging.getLogger(__name__)
READERS = {"hubspot": hubspot.Reader, "pipedrive": pipedrive.Reader, "salesforce": salesforce.Reader}


class Reader(Protocol):
    name: str
    api: Api

    def count(self) -> int | None: ...
    def pages(self, cursor: str | None) -> Any: ...
    def stages(self) -> list[CrmStage]: ...
    def owners(self) -> dict[str, str]: ...


class Checkpoint:
    """The cursor after the last wholly acknowledged page, in a small JSON file (atomic writes)."""

    def __init__(self, directory: Path, crm: str) -> None:
        self.path = directory / f"backfill-{crm}.json"

    def load(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


@dataclass
class Totals:
    deals: int = 0
    events: int = 0
    seconds: float = 0.0
    calls: int = 0
    retries: int = 0
    resumed_at: str | None = None
    skipped: Counter = field(default_factory=Counter)
    rejects: list[str] = field(default_factory=list)

    def line(self, crm: str, dry_run: bool) -> str:
        rate = f"{self.deals / self.seconds:,.0f} deals/s, {self.events / self.seconds:,.0f} events/s" \
            if self.seconds else ""
        verb = "would send" if dry_run else "sent"
        return (f"backfill {crm}: {counted(self.deals, 'deal')}, {verb} {counted(self.events, 'event')} "
                f"in {self.seconds:.1f}s ({rate}); {counted(self.calls, 'API call')}, {self.retries} retried"
                + (f"; resumed after {self.resumed_at}" if self.resumed_at else "")
                + (f"; skipped {dict(self.skipped)}" if self.skipped else "")
                + (f"; {counted(len(self.rejects), 'deal')} unreadable (logged)" if self.rejects else ""))


def counted(number: int, noun: str) -> str:
    """``1 deal``, ``2 deals``."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


async def backfill(reader: Reader, settings: Settings, state_dir: Path, *, since: str | None = None,
                   dry_run: bool = False, progress: bool | None = None) -> Totals:
    checkpoint = Checkpoint(state_dir, reader.name)
    saved = None if dry_run else checkpoint.load()
    if saved is not None and saved.get("since") != since:
        raise ValueError(f"{checkpoint.path} holds an interrupted run with --since {saved.get('since')}: "
                         "finish it with the same --since, or delete the file to start over")
    totals = Totals()
    cursor = None
    if saved is not None:
        cursor, totals.resumed_at = saved["cursor"], saved["cursor"]
        totals.deals, totals.events = saved["deals"], saved["events"]
    started = time.monotonic()
    total = await asyncio.to_thread(_count, reader)
    producer = None
    if not dry_run:
        await ensure_event_topics(settings)
        producer = await start_producer(settings)
    bar = Progress(TextColumn(f"{reader.name}"), BarColumn(), MofNCompleteColumn(), TextColumn("deals"),
                   TextColumn("{task.fields[events]} events"), TimeRemainingColumn(),
                   console=Console(stderr=True),
                   disable=not (sys.stderr.isatty() if progress is None else progress))
    try:
        with bar:
            task = bar.add_task("deals", total=total, completed=totals.deals, events=totals.events)
            pages = reader.pages(cursor)
            while (page := await asyncio.to_thread(next, pages, None)) is not None:
                events = page.events if since is None else limit_history(page.events, since)
                if producer is not None:
                    await _send(producer, events)
                totals.deals += page.deals
                totals.events += len(events)
                totals.skipped.update(page.skipped)
                _report(page, totals)
                if producer is not None:
                    _move(checkpoint, page, totals, since)
                bar.update(task, completed=totals.deals, events=totals.events)
    finally:
        if producer is not None:
            await producer.stop()
    totals.seconds = time.monotonic() - started
    totals.calls, totals.retries = reader.api.calls, reader.api.retried
    return totals


def _count(reader: Reader) -> int | None:
    """The CRM's deal count, for the progress bar's total and ETA only (Pipedrive's undocumented
    summary, a HubSpot search, a SOQL ``COUNT()``): if it fails the run goes on without an ETA,
    saying so on standard output (standard error is kept for what stops the run)."""
    try:
        total = reader.count()
    except (ApiError, Malformed, LookupError, TypeError, ValueError, AttributeError) as exc:
        why = str(exc) if isinstance(exc, ApiError) else f"unreadable answer, {type(exc).__name__}: {exc}"
        print(f"backfill {reader.name}: no deal count ({' '.join(why.split())}); "
              "going on without a total or ETA", flush=True)
        return None
    return total if isinstance(total, int) and not isinstance(total, bool) and total >= 0 else None


async def _send(producer: Any, events: list[dict[str, Any]]) -> None:
    """Produce a page's events and wait until the broker acknowledged every one."""
    futures = [await producer.send(topics.EVENTS, encode_event(event), key=event["deal_id"].encode())
               for event in events]
    await asyncio.gather(*futures)


def _move(checkpoint: Checkpoint, page: Page, totals: Totals, since: str | None) -> None:
    if page.cursor is None:
        checkpoint.clear()  # done: the next run starts over (and sends only duplicates)
    else:
        checkpoint.save({"cursor": page.cursor, "deals": totals.deals, "events": totals.events,
                         "since": since})


def _report(page: Page, totals: Totals) -> None:
    for exc in page.rejects:
        log.error("a deal could not be read and was not sent (%s): %s", exc.code, exc.reason)
        totals.rejects.append(exc.reason)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The CLI command: ``args`` has ``crm``, ``since``, ``dry_run``, ``print_stage_map``."""
    options = {name: value for name, value in vars(args).items()
               if name in BackfillSettings.model_fields and value is not None}
    try:
        backfill_settings = load_settings(BackfillSettings, **options)
        ctx = context(settings, SourceSettings())
        reader = READERS[args.crm](backfill_settings, ctx)
        if args.print_stage_map:
            sys.stdout.write(render(args.crm, reader.stages(), reader.owners(), ctx.config))
            return 0
        since = None if args.since is None else from_iso(args.since, "--since")
        totals = asyncio.run(backfill(reader, settings, backfill_settings.backfill_state_dir, since=since,
                                      dry_run=args.dry_run))
    except (ValueError, Malformed, ApiError, salesforce.BudgetSpent) as exc:
        print("funnel-kpi: backfill: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    print(totals.line(args.crm, args.dry_run))
    return 1 if totals.rejects else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("crm", choices=sorted(READERS), help="the CRM to read")
    parser.add_argument("--since", default=None,
                        help="leave out history before this date/time (each deal's values then are kept)")
    parser.add_argument("--dry-run", action="store_true", help="read and count, produce nothing")
    parser.add_argument("--print-stage-map", action="store_true",
                        help="print a stage_maps block from the CRM's pipelines and stages and an "
                        "owners block from its owners / users, then exit")
    group = parser.add_argument_group("backfill settings (flag or environment variable; credentials: "
                                      "environment or *_FILE only)")
    for name in FLAGS:
        add_setting_flag(group, BackfillSettings, name)
