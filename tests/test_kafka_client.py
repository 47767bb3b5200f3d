"""The Kafka security settings and the one helper every client is built with (no broker needed)."""

import ast
from pathlib import Path

import pytest
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from streams.kafka.client import BrokerUnavailable, KafkaSecurity, client_args, faust_args, load_security

from .conftest import ROOT

CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "AIOKafkaClient"}
HELPERS = {"client_args", "faust_args"}


def _called(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    return None


def _client_name(call: ast.Call) -> str | None:
    name = _called(call)
    if name in CLIENTS:
        return name
    func = call.func
    if name == "App" and isinstance(func, ast.Attribute) and getattr(func.value, "id", None) == "faust":
        return "faust.App"
    return None


def _helper_calls(node: ast.AST) -> bool:
    return any(_called(inner) in HELPERS for inner in ast.walk(node))


def _spreads_helper(call: ast.Call, scope: ast.AST, functions: dict[str, ast.AST]) -> bool:
    """A ``**x`` argument where x is a helper call, a local name bound to one, or a call of a
    function of the same module that builds its dict with one."""
    for keyword in call.keywords:
        if keyword.arg is not None:
            continue
        value = keyword.value
        if _called(value) in HELPERS:
            return True
        if _called(value) in functions and _helper_calls(functions[_called(value)]):
            return True
        if isinstance(value, ast.Name):
            for node in ast.walk(scope):
                if (isinstance(node, ast.Assign) and _called(node.value) in HELPERS
                        and any(getattr(t, "id", None) == value.id for t in node.targets)):
                    return True
    return False


def client_constructions(root: Path = ROOT) -> list[tuple[str, int, str, bool]]:
    """(file, line, client, built with the helper) for every Kafka client in streams/ and bench/."""
    found = []
    for path in sorted([*(root / "streams").rglob("*.py"), *(root / "bench").rglob("*.py")]):
        tree = ast.parse(path.read_text(), str(path))
        functions = {node.name: node for node in ast.walk(tree)
                     if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
        scopes = [node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)]
        for scope in [tree, *scopes]:
            for node in ast.iter_child_nodes(scope) if scope is tree else ast.walk(scope):
                if not isinstance(node, ast.Call) or _client_name(node) is None:
                    continue
                overridden = {k.arg for k in node.keywords} & {"bootstrap_servers", "broker",
                                                               "security_protocol", "ssl_context"}
                ok = _spreads_helper(node, scope, functions) and not overridden
                found.append((str(path.relative_to(root)), node.lineno, _client_name(node), ok))
    return sorted(set(found))


def test_every_kafka_client_is_built_with_the_security_helper():
    found = client_constructions()
    files = {file for file, *_ in found}
    # The scan must see the clients it guards (a scan that finds nothing would pass).
    assert {"streams/worker/faust_app.py", "streams/worker/loop.py", "streams/worker/outbox.py",
            "streams/tools/producer.py",
            "streams/http/ingest.py", "streams/crm/adapt.py", "streams/http/api.py", "streams/tools/erase.py",
            "streams/kafka/topics.py",
            "bench/naive_app.py", "bench/measure.py", "bench/soak.py", "bench/run.py"} <= files
    bare = [f"{file}:{line} {client}" for file, line, client, ok in found if not ok]
    assert not bare, "Kafka clients built without kafka_client.client_args/faust_args: " + ", ".join(bare)


def test_the_scan_flags_clients_built_without_the_helper(tmp_path):
    (tmp_path / "streams").mkdir()
    (tmp_path / "bench").mkdir()
    (tmp_path / "streams" / "probe.py").write_text(
        "import faust\nfrom aiokafka import AIOKafkaProducer\n\n\n"
        "def make(url):\n    return AIOKafkaProducer(bootstrap_servers=[url])\n\n\n"
        "def app(url):\n    return faust.App('x', broker=url)\n\n\n"
        "def overridden(url):\n"
        "    return AIOKafkaProducer(**client_args(url), security_protocol='PLAINTEXT')\n\n\n"
        "def fine(url):\n    connect = client_args(url)\n    return AIOKafkaProducer(**connect)\n")
    assert client_constructions(tmp_path) == [
        ("streams/probe.py", 6, "AIOKafkaProducer", False),
        ("streams/probe.py", 10, "faust.App", False),
        ("streams/probe.py", 14, "AIOKafkaProducer", False),
        ("streams/probe.py", 19, "AIOKafkaProducer", True),
    ]


def security(**env: str) -> KafkaSecurity:
    return KafkaSecurity(**{key.lower(): value for key, value in env.items()})


def test_plaintext_by_default(monkeypatch):
    for name in list(KafkaSecurity.model_fields):
        monkeypatch.delenv(f"FUNNEL_KAFKA_{name.upper()}", raising=False)
    assert client_args("kafka://a:9092;b:9093") == {"bootstrap_servers": ["a:9092", "b:9093"],
                                                    "security_protocol": "PLAINTEXT"}
    assert faust_args("kafka://a:9092") == {"broker": "kafka://a:9092", "broker_credentials": None}


@pytest.mark.parametrize("protocol,mechanism", [
    ("SSL", "PLAIN"), ("SASL_PLAINTEXT", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-256"),
    ("SASL_PLAINTEXT", "SCRAM-SHA-512"),
])
def test_faust_gets_the_same_connection_arguments_as_aiokafka(protocol, mechanism):
    """Faust's driver turns broker_credentials back into aiokafka arguments: they must match."""
    settings = security(security_protocol=protocol, sasl_mechanism=mechanism, sasl_username="svc",
                        sasl_password="s3cret")
    direct = settings.aiokafka_args()
    via_faust = dict(credentials_to_aiokafka_auth(settings.faust_credentials()))
    assert direct["security_protocol"] == via_faust["security_protocol"] == protocol
    if protocol.startswith("SASL"):
        assert via_faust["sasl_mechanism"] == direct["sasl_mechanism"] == mechanism
        assert via_faust["sasl_plain_username"] == "svc" and via_faust["sasl_plain_password"] == "s3cret"
    tls = protocol in ("SSL", "SASL_SSL")
    assert (via_faust.get("ssl_context") is not None) == tls == ("ssl_context" in direct)
    if tls:
        assert direct["ssl_context"].check_hostname and via_faust["ssl_context"].check_hostname


def test_hostname_verification_can_be_turned_off_explicitly():
    assert not security(security_protocol="SSL", ssl_check_hostname="false").ssl_context().check_hostname


def test_the_password_comes_from_a_mounted_secret_file(tmp_path):
    secret = tmp_path / "kafka-password"
    secret.write_text("from-the-file\n")
    settings = security(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                        sasl_username="svc", sasl_password_file=str(secret))
    assert settings.aiokafka_args()["sasl_plain_password"] == "from-the-file"


def test_a_missing_secret_file_is_one_line_naming_the_setting(tmp_path):
    settings = security(security_protocol="SASL_PLAINTEXT", sasl_username="svc",
                        sasl_password_file=str(tmp_path / "absent"))
    with pytest.raises(BrokerUnavailable,
                       match=r"^FUNNEL_KAFKA_SASL_PASSWORD_FILE=.*absent: cannot read the secret file"):
        settings.aiokafka_args()


def test_a_missing_ca_file_names_the_setting(tmp_path):
    with pytest.raises(BrokerUnavailable, match=r"^FUNNEL_KAFKA_SSL_CAFILE .*nope.pem: no such file"):
        security(security_protocol="SSL", ssl_cafile=str(tmp_path / "nope.pem")).aiokafka_args()


@pytest.mark.parametrize("env,message", [
    ({"FUNNEL_KAFKA_SECURITY_PROTOCOL": "TLS"}, "FUNNEL_KAFKA_SECURITY_PROTOCOL: Input should be"),
    ({"FUNNEL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FUNNEL_KAFKA_SASL_MECHANISM": "GSSAPI"},
     "FUNNEL_KAFKA_SASL_MECHANISM: Input should be"),
    ({"FUNNEL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FUNNEL_KAFKA_SASL_PASSWORD": "hunter2"},
     "needs FUNNEL_KAFKA_SASL_USERNAME"),
    ({"FUNNEL_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "FUNNEL_KAFKA_SASL_USERNAME": "svc"},
     "needs FUNNEL_KAFKA_SASL_PASSWORD or FUNNEL_KAFKA_SASL_PASSWORD_FILE"),
    ({"FUNNEL_KAFKA_SSL_CERTFILE": "/c.pem"},
     "FUNNEL_KAFKA_SSL_CERTFILE and FUNNEL_KAFKA_SSL_KEYFILE go together"),
])
def test_bad_security_settings_are_one_line_without_the_secret(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(BrokerUnavailable) as raised:
        load_security()
    text = str(raised.value)
    assert message in text and "\n" not in text and "hunter2" not in text


def test_the_password_never_shows_in_the_settings_repr():
    settings = security(security_protocol="SASL_SSL", sasl_username="svc", sasl_password="hunter2")
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())


def test_no_security_setting_is_a_command_line_flag():
    from streams.tools.cli import parser

    flags = parser().format_help() + "".join(
        action.format_help() for action in parser()._subparsers._group_actions[0].choices.values()
    )
    assert "sasl" not in flags and "ssl" not in flags


def test_empty_values_mean_unset(monkeypatch):
    """docker compose passes ``${VAR:-}`` through as an empty string."""
    for name in KafkaSecurity.model_fields:
        monkeypatch.setenv(f"FUNNEL_KAFKA_{name.upper()}", "")
    assert load_security() == KafkaSecurity.model_construct(**{
        name: field.default for name, field in KafkaSecurity.model_fields.items()})
    assert client_args("kafka://k:9092")["security_protocol"] == "PLAINTEXT"
