"""The engine is pinned, locked and checked: exact versions of faust-streaming and aiokafka
everywhere (pyproject, locks, the running venv), a worker that refuses others, and the patched
function in streams/worker/faust_patches.py seen called by real workers through a real recovery
and rebalance (a release that stopped calling it would silently undo it)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tomllib
from importlib.metadata import version

import pytest

from models.kpis import Samples
from streams.kafka.settings import Settings
from streams.tools.producer import produce
from streams.tools.simulator import Simulation
from streams.worker import engine, faust_patches

from .conftest import ROOT, settled, wait_until


def pinned(requirements: list[str]) -> dict[str, str]:
    return dict(re.fullmatch(r"([\w.-]+)==([\w.!+-]+)", req).groups()
                for req in requirements if "==" in req)


def locked(path) -> dict[str, str]:
    return dict(re.findall(r"^([\w.-]+)==(\S+) \\$", path.read_text(), re.M))


def test_the_tested_engine_is_pinned_locked_and_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {name: pinned(project["dependencies"]).get(name) for name in engine.TESTED} == engine.TESTED
    for lock in ("requirements.lock", "requirements-dev.lock"):
        assert {name: locked(ROOT / lock).get(name) for name in engine.TESTED} == engine.TESTED, lock
    assert {name: version(name) for name in engine.TESTED} == engine.TESTED
    assert engine.untested() == {}


def test_untested_lists_each_other_version():
    other = {"faust-streaming": "0.15.4", "aiokafka": "missing"}
    assert engine.untested(other.__getitem__) == other


def run_worker_with_aiokafka(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """A real worker start-up whose interpreter finds aiokafka 0.15.0's metadata first (an
    upgraded environment, as importlib.metadata sees it)."""
    dist = tmp_path / "shadow" / "aiokafka-0.15.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: aiokafka\nVersion: 0.15.0\n")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")}
    return subprocess.run(
        [sys.executable, "-m", "streams.tools.cli", "worker"], cwd=ROOT, capture_output=True, text=True,
        env={**clean, "PYTHONPATH": str(dist.parent), "FUNNEL_BROKER": "kafka://127.0.0.1:1",
             "FUNNEL_CONFIG": str(tmp_path / "absent.yaml"), **env}, timeout=120,
    )


def test_a_worker_refuses_an_untested_engine_in_one_line(tmp_path):
    result = run_worker_with_aiokafka(tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "funnel-kpi: untested stream engine: aiokafka 0.15.0 (tested: 0.14.0); "
        "streams/worker/faust_patches.py replaces a private part of them, and another release may "
        "stop calling it. Install the locked versions (pip install --require-hashes -r "
        "requirements.lock), or set FUNNEL_ALLOW_UNTESTED_ENGINE=true if tests/test_engine.py "
        "passes on these versions"
    ]


def test_the_override_starts_with_a_warning(tmp_path):
    result = run_worker_with_aiokafka(tmp_path, FUNNEL_ALLOW_UNTESTED_ENGINE="true")
    # past the check: the next start-up step (the funnel config) is what stops it here
    assert "WARNING funnel_kpi: untested stream engine: aiokafka 0.15.0 (tested: 0.14.0)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("funnel-kpi: config error: cannot read funnel config")


def patch_calls(samples: Samples) -> dict[str, float]:
    return {labels["patch"]: value for labels, value in samples["funnel_faust_patch_calls_total"]}


def send(broker_url: str, events: list[dict]) -> None:
    asyncio.run(produce(Settings(broker=broker_url, partitions=4), events, progress=False))


@pytest.mark.broker
def test_the_patch_is_called_by_every_worker_through_a_real_recovery_and_rebalance(broker, workers):
    first_half, second_half = Simulation(seed=11, deals=300, days=60).events(), \
        Simulation(seed=12, deals=300, days=60).events()
    w1 = workers("w1")
    w1.wait_ready()
    send(broker.url, first_half)
    settled([w1], len(first_half))
    before = patch_calls(w1.samples())

    # A second worker joins: a rebalance, and it recovers the deals of the partitions it takes
    # from their changelogs (the exact totals below hold only if that recovery was complete).
    w2 = workers("w2")
    w2.wait_ready()
    send(broker.url, second_half)
    settled([w1, w2], len(first_half) + len(second_half))

    def every_patch_called():
        calls = {"w1": patch_calls(w1.samples()), "w2": patch_calls(w2.samples())}
        return calls if all(count > 0 for one in calls.values() for count in one.values()) else None

    after = wait_until(every_patch_called, 90, what="the patch called on both workers",
                       show=lambda: (patch_calls(w1.samples()), patch_calls(w2.samples())))
    assert set(after["w1"]) == set(after["w2"]) == set(faust_patches.PATCHES)
    assert before["create_worker_consumer"] >= 1  # Faust's consumer has our fetch wait
