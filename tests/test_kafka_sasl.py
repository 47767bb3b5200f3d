"""Kafka with SASL/SCRAM: the embedded broker's own ``--authentication`` for the refusals, and a
real SCRAM server in front of it (tests/sasl_gate.py says why) for a whole run that logs in."""

import pytest

from streams.tools.broker import EmbeddedBroker, free_port

from .conftest import DATASET
from .sasl_gate import SaslGate
from .test_kafka_tls import assert_one_line_exit_2, assert_secured_replay_is_exact, cli

pytestmark = pytest.mark.broker

PASSWORD = "correct horse battery staple"


def scram_env(broker_url: str, mechanism: str, password: str) -> dict[str, str]:
    return {"FUNNEL_BROKER": broker_url, "FUNNEL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "FUNNEL_KAFKA_SASL_MECHANISM": mechanism, "FUNNEL_KAFKA_SASL_USERNAME": "funnel",
            "FUNNEL_KAFKA_SASL_PASSWORD": password, "FUNNEL_KAFKA_CONNECT_TIMEOUT": "3"}


@pytest.fixture
def tansu_with_authentication(tmp_path):
    with EmbeddedBroker(log_path=tmp_path / "broker.log", authentication=True) as running:
        yield running


@pytest.fixture
def scram_broker(tmp_path):
    """Tansu behind the SCRAM gate; Tansu advertises the gate's port."""
    gate_port = free_port()
    with EmbeddedBroker(gate_port, tmp_path / "broker.log", listen_port=free_port()) as broker:
        gate = SaslGate(gate_port, broker.listen_port, "funnel", PASSWORD).start()
        try:
            yield broker, gate
        finally:
            gate.stop()


def test_tansu_refuses_a_wrong_scram_password_and_the_worker_exits_in_one_line(
        tansu_with_authentication, tmp_path):
    env = {**scram_env(tansu_with_authentication.url, "SCRAM-SHA-256", "not-the-password"),
           "FUNNEL_DATA_DIR": str(tmp_path / "data")}
    result = cli(["worker"], env, timeout=60)
    line = assert_one_line_exit_2(result, "Kafka at")
    assert "refused SASL SCRAM-SHA-256 login as 'funnel'" in line
    assert "not-the-password" not in result.stderr + result.stdout


def test_tansu_with_authentication_refuses_a_client_without_sasl(tansu_with_authentication, tmp_path):
    env = {"FUNNEL_BROKER": tansu_with_authentication.url, "FUNNEL_KAFKA_CONNECT_TIMEOUT": "3"}
    line = assert_one_line_exit_2(cli(["replay", str(DATASET), "--partitions", "4"], env, timeout=60),
                                  "no Kafka broker reachable")
    assert "FUNNEL_KAFKA_SECURITY_PROTOCOL (PLAINTEXT)" in line


def test_dataset_replay_with_scram_gives_the_literal_values(scram_broker, tmp_path):
    broker, gate = scram_broker
    secret = tmp_path / "kafka-password"
    secret.write_text(PASSWORD + "\n")
    env = scram_env(broker.url, "SCRAM-SHA-512", "")
    del env["FUNNEL_KAFKA_SASL_PASSWORD"]
    env["FUNNEL_KAFKA_SASL_PASSWORD_FILE"] = str(secret)
    assert_secured_replay_is_exact(broker.url, tmp_path, "scram", env)
    # Faust's consumer and producer, the events consumer, the topic admin, the API's reader
    # and the replay's producer each log in on their own connections.
    assert len(gate.logins) >= 6 and set(gate.logins) == {("SCRAM-SHA-512", "funnel", True)}


def test_a_wrong_scram_password_is_refused_by_the_server_in_one_line(scram_broker, tmp_path):
    broker, gate = scram_broker
    env = {**scram_env(broker.url, "SCRAM-SHA-256", "wrong"), "FUNNEL_DATA_DIR": str(tmp_path / "data")}
    line = assert_one_line_exit_2(cli(["worker"], env, timeout=60), "Kafka at")
    assert "refused SASL SCRAM-SHA-256 login as 'funnel'" in line
    assert gate.logins == [("SCRAM-SHA-256", "funnel", False)]
