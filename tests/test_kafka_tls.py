"""Kafka over real TLS: stunnel in front of the embedded broker, certificates made in the test.

The whole dataset goes through the terminator (``funnel-kpi replay`` in, the worker's Faust
consumer, producers, changelogs and the events consumer out) and the KPIs are exact; start-up
refusals (wrong CA, unreachable broker) are one line and exit code 2.
"""

import os
import subprocess

import pytest

from bench.tls_broker import TlsBroker, TlsFiles, make_ca
from streams.tools.broker import free_port

from .conftest import DATASET, DATASET_EVENTS, WorkerProcess, settled
from .conftest import cli as run_cli
from .test_e2e_pipeline import assert_dataset_values

pytestmark = pytest.mark.broker


@pytest.fixture
def tls_broker(tmp_path):
    with TlsBroker(TlsFiles.create(tmp_path / "certs"), tmp_path) as running:
        yield running


def cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return run_cli(*args, env={**os.environ, **env}, timeout=timeout)


def assert_one_line_exit_2(result: subprocess.CompletedProcess, starts: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"funnel-kpi: {starts}"), lines[0]
    return lines[0]


def assert_secured_replay_is_exact(broker_url: str, tmp_path, name: str, env: dict[str, str]) -> None:
    """A worker and ``replay`` with these connection settings: the dataset's literal values."""
    env = {**env, "FUNNEL_CLOCK": "stream"}
    worker = WorkerProcess(broker_url, tmp_path, name, **env).start()
    try:
        worker.wait_ready()
        sent = cli(["replay", str(DATASET), "--partitions", "4"], env, timeout=180)
        assert sent.returncode == 0, sent.stderr
        assert_dataset_values(settled([worker], DATASET_EVENTS))
    finally:
        worker.stop()


def test_dataset_replay_over_tls_gives_the_literal_values(tls_broker, tmp_path):
    assert_secured_replay_is_exact(tls_broker.url, tmp_path, "tls", tls_broker.env())


def test_a_wrong_ca_stops_the_worker_at_start_up_in_one_line(tls_broker, tmp_path):
    wrong_ca, _ = make_ca(tmp_path / "other", "wrong-ca")
    env = {**tls_broker.env(), "FUNNEL_KAFKA_SSL_CAFILE": str(wrong_ca),
           "FUNNEL_KAFKA_CONNECT_TIMEOUT": "3", "FUNNEL_DATA_DIR": str(tmp_path / "data")}
    line = assert_one_line_exit_2(cli(["worker"], env, timeout=60), "TLS handshake with Kafka")
    assert "FUNNEL_KAFKA_SSL_CAFILE" in line and "wrong-ca.pem" in line


def test_plaintext_against_the_tls_port_names_the_protocol_setting(tls_broker, tmp_path):
    env = {"FUNNEL_BROKER": tls_broker.url, "FUNNEL_KAFKA_CONNECT_TIMEOUT": "3"}
    line = assert_one_line_exit_2(cli(["replay", str(DATASET), "--partitions", "4"], env, timeout=60),
                                  "no Kafka broker reachable")
    assert "within 3s (FUNNEL_KAFKA_CONNECT_TIMEOUT)" in line and "FUNNEL_KAFKA_SECURITY_PROTOCOL" in line


def test_an_unreachable_broker_stops_the_worker_within_the_connect_timeout(tmp_path):
    env = {"FUNNEL_BROKER": f"kafka://127.0.0.1:{free_port()}", "FUNNEL_KAFKA_CONNECT_TIMEOUT": "3",
           "FUNNEL_DATA_DIR": str(tmp_path / "data")}
    # The subprocess limit (25 s) is below the 30 s default: a worker that ignored the
    # setting would be killed here instead of exiting 2.
    line = assert_one_line_exit_2(cli(["worker"], env, timeout=25), "no Kafka broker reachable")
    assert "within 3s (FUNNEL_KAFKA_CONNECT_TIMEOUT)" in line and "FUNNEL_BROKER" in line
