"""Shared fixtures: the dataset location, a real broker, worker processes, metric scraping."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from models.config import DEFAULT_CONFIG
from models.kpis import Samples, parse_exposition, total
from streams.tools.broker import EmbeddedBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "crm-sales-opportunities"
DATASET_EVENTS = 15_511  # 8,800 deals: one event each, two for the 6,711 closed ones
# The live worker's config names one rep (the dataset's owner ids are the reps' names): the
# leaderboard shows that name, and every other rep by id.
LIVE_OWNER_NAMES = {"Darcel Schlecht": "D. Schlecht (Central)"}
# Teams: the dataset's managers (sales_teams.csv), except that the reps of UNLISTED_MANAGER are
# not in the owners map at all: they count in team none and show by id (Corliss Cosme is in
# the top 10).
UNLISTED_MANAGER = "Cara Losch"
# The dataset's dimensions (issue 23): dimension name → dataset column (its accounts, products
# and sales teams joined to each deal). The live worker's config names them all.
DATASET_DIMENSIONS = {"sector": "sector", "office_location": "office_location",
                      "product": "product", "series": "series", "manager": "manager",
                      "regional_office": "regional_office"}


# Quotas of the live worker's config (issue 23, item 4): the top rep and one team.
LIVE_QUOTAS = {"reps": {"Darcel Schlecht": {"quarter": 300_000, "year": 1_000_000}},
               "teams": {"Melvin Marxen": {"quarter": 600_000, "year": 2_000_000}}}


def team_owners() -> dict[str, dict[str, str]]:
    """The ``owners`` block of the replay's funnel config: managers as teams, one named rep."""
    from streams.tools.dataset import dataset_owners

    return dataset_owners(DATASET, names=LIVE_OWNER_NAMES, unlisted_managers=frozenset({UNLISTED_MANAGER}))


def team_config(path: Path) -> Path:
    """The shipped funnel config with :func:`team_owners` and the :data:`DATASET_DIMENSIONS`,
    written to ``path``."""
    shipped = yaml.safe_load(DEFAULT_CONFIG.read_text())
    dimensions = {name: {"sources": {"csv": column}} for name, column in DATASET_DIMENSIONS.items()}
    # Reporting currency USD (the dataset's own: converted figures equal the native ones), a
    # rates file (EUR, which no deal has: the unconverted rows are 0) and quotas for the boards.
    (path.parent / "rates.csv").write_text("date,currency,rate\n2017-01-01,EUR,1.1\n")
    reporting = {"reporting_currency": "USD", "rates": {"file": "rates.csv"},
                 "quotas": LIVE_QUOTAS}
    path.write_text(yaml.safe_dump({**shipped, "owners": team_owners(), "dimensions": dimensions,
                                    **reporting}))
    return path


def batch_team_revenue() -> dict[str, float]:
    """Won revenue per team computed in batch from the CSV files: each Won row's close_value,
    under the team :func:`team_owners` gives its sales agent (``none`` if none)."""
    import csv

    owners = team_owners()
    teams: dict[str, float] = {}
    with (DATASET / "sales_pipeline.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["deal_stage"] == "Won":
                team = owners.get(row["sales_agent"], {}).get("team", "none")
                teams[team] = teams.get(team, 0.0) + float(row["close_value"] or 0)
    return teams


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition",
               show=None):
    """``show``: what to report on a timeout instead of the predicate's last (falsy) answer."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    shown = show() if show is not None else last
    shown = shown if isinstance(shown, str) else repr(shown)
    raise TimeoutError(f"{what} not reached within {timeout:.0f}s (last: {shown})")


def cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """``funnel-kpi *args`` as a subprocess in the repo, output captured as text; ``kwargs`` go
    to subprocess.run (env, timeout, ...)."""
    return subprocess.run([sys.executable, "-m", "streams.tools.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, **kwargs)


def scrape(url: str, timeout: float = 3) -> Samples | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return parse_exposition(response.read().decode())
    except OSError:
        return None


class WorkerProcess:
    """``funnel-kpi worker`` as a real OS process (so it can be killed with SIGKILL)."""

    def __init__(self, broker_url: str, workdir: Path, name: str = "w1",
                 module: str = "streams.tools.cli", **env: str) -> None:
        self.module = module  # tests.faults: the same worker with faults injected by the test
        self.port = free_port()
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self.env = {
            **os.environ,
            "FUNNEL_BROKER": broker_url,
            "FUNNEL_WEB_PORT": str(self.port),
            "FUNNEL_WEB_BIND": "127.0.0.1",
            "FUNNEL_DATA_DIR": str(workdir / f"data-{name}"),
            "FUNNEL_PARTITIONS": "4",
            "FUNNEL_SESSION_TIMEOUT": "6",
            "FUNNEL_REBALANCE_TIMEOUT": "6",
            "FUNNEL_LOG_LEVEL": "info",
            # Tansu answers ListOffsets below offsets it acknowledged, so a partition moving to
            # the worker that held its standby copy fails Faust's check (persisted > highwater)
            # with any store; on Apache Kafka the check stays on (the default).
            "FUNNEL_RECOVERY_CONSISTENCY_CHECK": "false",
            **env,
        }
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self) -> WorkerProcess:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module, "worker"], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT,
        )
        return self

    def samples(self) -> Samples | None:
        return scrape(self.url)

    def wait_ready(self, timeout: float = 60) -> None:
        def ready():
            if self.process.poll() is not None:
                if self._port_taken():
                    return False  # started again on another port
                raise RuntimeError(f"worker exited: {self.log_tail()}")
            samples = self.samples()
            return samples is not None and total(samples, "funnel_worker_ready") == 1
        wait_until(ready, timeout, what=f"worker {self.name} ready")

    def _port_taken(self) -> bool:
        """Whether the worker exited because its web port was taken between picking and binding
        (parallel test processes pick ports too); if so, start it again on another port."""
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            said = log.read().decode(errors="replace")
        if f"('127.0.0.1', {self.port}): address already in use" not in said:
            return False
        self.port = free_port()
        self.env["FUNNEL_WEB_PORT"] = str(self.port)
        self.start()
        return True

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def broker(tmp_path):
    """A fresh Tansu broker per test: topics are fixed names, so tests must not share one."""
    with EmbeddedBroker(log_path=tmp_path / "broker.log") as running:
        yield running


@pytest.fixture
def workers(broker, tmp_path):
    started: list[WorkerProcess] = []

    def start(name: str = "w1", **env: str) -> WorkerProcess:
        worker = WorkerProcess(broker.url, tmp_path, name, **env).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def run_async(coro):
    return asyncio.run(coro)


def credits_settled(samples: Samples | None) -> bool:
    """Customer credits travel through their own topic: done when CLV adds up to revenue."""
    if not samples:
        return False
    revenue = total(samples, "funnel_won_revenue")
    # Both are sums of exact per-worker values, split differently (deals by deal id, customers
    # by account): as floats they may differ in the last bit; a missing credit is ≥ 1 cent.
    return abs(total(samples, "funnel_customer_lifetime_value_gsum") - revenue) < 0.005


def merged(samples_list: list[Samples]) -> Samples:
    """The samples of several workers as one: each metric's values, in order."""
    out: Samples = {}
    for samples in samples_list:
        for name, values in samples.items():
            out.setdefault(name, []).extend(values)
    return out


def exported_partitions(samples: Samples) -> list[str]:
    """The partitions the samples export (value 1), once per exporting worker."""
    return [labels["partition"] for labels, value in samples.get("funnel_partition_exported", [])
            if value == 1]


def exported_once(merged: Samples) -> bool:
    """Every partition exported by exactly one of the workers whose samples are merged (the gate
    of the recording rules): only then do summed KPI gauges mean the whole funnel."""
    partitions = int(max((value for _, value in merged.get("funnel_partitions", [])), default=0))
    exported = exported_partitions(merged)
    return partitions > 0 and len(exported) == partitions == len(set(exported))


def settled(worker_list, expected_events: int, timeout: float = 90) -> Samples:
    """Wait until the workers have counted every event and report the summed samples. Workers
    that own partitions must be ready: during a rebalance nothing is exported, and credits
    would "add up" at zero."""

    seen: list[str] = []  # what the last check found, for the timeout message

    def check():
        found: list[Samples] = []
        for worker in worker_list:
            samples = worker.samples()
            if samples is None:
                seen[:] = ["a worker's /metrics did not answer"]
                return None
            if total(samples, "funnel_active_partitions") and not total(samples, "funnel_worker_ready"):
                seen[:] = [f"a worker owns {total(samples, 'funnel_active_partitions'):.0f} "
                           "partitions but is not ready"]
                return None
            found.append(samples)
        summed = merged(found)
        counted = total(summed, "funnel_events_total")
        done = counted >= expected_events and exported_once(summed) and credits_settled(summed)
        seen[:] = [f"{counted:.0f} events counted, partitions exported "
                   f"{sorted(exported_partitions(summed))}, credits settled "
                   f"{credits_settled(summed)}"]
        return summed if done else None

    def show() -> str:
        logs = "\n".join(f"--- worker log tail:\n{worker.log_tail(15)}" for worker in worker_list
                         if hasattr(worker, "log_tail"))
        return f"{seen[0] if seen else 'nothing checked'}\n{logs}"

    return wait_until(check, timeout, what=f"{expected_events} events counted", show=show)


@pytest.fixture(scope="module")
def live_metrics_url(tmp_path_factory):
    """/metrics of a real worker after the dataset replay, stream clock at 2017-12-31, with the
    shipped config plus :func:`team_owners` (managers as teams, ``LIVE_OWNER_NAMES``)."""
    from streams.kafka.settings import Settings
    from streams.tools.dataset import dataset_events
    from streams.tools.producer import produce

    workdir = tmp_path_factory.mktemp("live-worker")
    config = team_config(workdir / "funnel.yaml")
    with EmbeddedBroker(log_path=workdir / "broker.log") as running:
        worker = WorkerProcess(running.url, workdir, FUNNEL_CLOCK="stream", FUNNEL_CONFIG=str(config)).start()
        try:
            worker.wait_ready()
            run_async(produce(Settings(broker=running.url, partitions=4),
                              list(dataset_events(DATASET, dimensions=DATASET_DIMENSIONS)),
                              progress=False))
            settled([worker], DATASET_EVENTS)
            yield worker.url
        finally:
            worker.stop()


# ------------------------------------------------------------------ parallel runs (pytest-xdist)
# `make test` runs the suite in several processes (`-n 6 --dist loadgroup`): the tests are
# independent (each starts its own broker, workers and servers on free ports, in its own
# tmp_path), and most of their time is spent waiting on group joins, timeouts and sleeps.
# Arranged here:
#  - the tests of a module with a module-scoped fixture (a replayed worker, the compose stack,
#    ...) run in one process, one after the other, so the fixture is built once;
#  - the end-to-end tests (marked ``broker``, up to two minutes each) are handed out before the
#    others, so no process starts a long one while the rest are nearly done.
# (xdist's own loadgroup scheduler reads ``xdist_group`` marks through node ids, which pytest 9.2
# no longer lets a plugin change, so it groups nothing: pytest-xdist#1386. This one replaces it.)
_WIDER_FIXTURE = re.compile(
    r"@pytest\.fixture\([^)]*scope=[\"'](?:class|module|package|session)[\"'][^)]*\)\s*\ndef (\w+)")


@functools.cache
def _shares_a_fixture(module: str) -> bool:
    """Whether the tests of ``module`` (a path from the repository root) share a fixture wider
    than one test: one the module defines, or one of this file's that it names."""
    path = ROOT / module
    if not path.is_file():
        return False
    text = path.read_text()
    return bool(_WIDER_FIXTURE.search(text)) or any(
        re.search(rf"\b{name}\b", text) for name in _WIDER_FIXTURE.findall(Path(__file__).read_text()))


def _unit(nodeid: str) -> str:
    """What one process runs in one go: a test, or every test of a module sharing a fixture."""
    module = nodeid.split("::")[0]
    return module if _shares_a_fixture(module) else nodeid


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        """Units of :func:`_unit`, handed out in the order the processes collected them."""

        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid)

    config.option.loadscopereorder = False
    return UnitScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """In each process of a parallel run (they must agree): the units with the most end-to-end
    tests first, each unit's tests together and in the files' order."""
    if not hasattr(config, "workerinput"):  # one process: the files' order
        return
    weight: dict[str, float] = {}
    for item in items:
        unit = _unit(item.nodeid)
        weight[unit] = weight.get(unit, 0.0) + (10.0 if item.get_closest_marker("broker") else 0.1)
    items.sort(key=lambda item: -weight[_unit(item.nodeid)])
