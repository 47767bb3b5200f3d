"""The command line: settings documented by --help, config errors are clear, the demo shows KPIs."""

import subprocess
import sys

import pytest

from streams.settings import Settings
from streams.startup import is_secret

from .conftest import ROOT


def cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, **kwargs)


def test_worker_help_lists_every_setting_but_secrets_with_its_variable():
    out = cli("worker", "--help").stdout
    for name in Settings.model_fields:
        if is_secret(Settings, name):  # environment or FUNNEL_<NAME>_FILE only
            assert f"--{name.replace('_', '-')}" not in out
            continue
        assert f"--{name.replace('_', '-')}" in out
        assert f"FUNNEL_{name.upper()}" in out


def test_top_level_help_lists_the_commands():
    out = cli("--help").stdout
    for command in ("broker", "worker", "replay", "simulate", "demo"):
        assert command in out


def test_bad_config_stops_the_worker_with_a_clear_message(tmp_path):
    bad = tmp_path / "funnel.yaml"
    bad.write_text("pipelines: {default: {stages: []}}")
    result = cli("worker", "--config", str(bad), "--broker", "kafka://127.0.0.1:1")
    assert result.returncode == 2
    assert "config error" in result.stderr and str(bad) in result.stderr


@pytest.mark.broker
def test_demo_shows_live_kpis_within_a_minute():
    result = cli("demo", "--duration", "40", "--rate", "2000", "--deals", "800", timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    screens = result.stdout.split("funnel-kpi demo · pipeline default")
    assert len(screens) > 1, result.stdout[-2000:]
    last = screens[-1]
    for words in ("lead", "opportunity", "win rate", "avg deal size", "avg sales cycle", "top reps: 1."):
        assert words in last
    assert "accepted 0 " not in last
    assert "demo stopped" in result.stdout
