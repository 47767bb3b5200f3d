"""Kafka with SASL OAUTHBEARER: an OAuth client-credentials token from a local token endpoint, and
an Amazon MSK IAM token signed by AWS's signer library, each checked by a broker front (the SASL
gate in front of the embedded broker) the way the managed brokers check them."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, parse_qsl, quote, urlsplit

import pytest

from streams.kafka.client import KafkaSecurity
from streams.kafka.oauth import ClientCredentialsTokens, TokenRefused
from streams.tools.broker import EmbeddedBroker, free_port

from .conftest import DATASET
from .sasl_gate import SaslGate
from .test_kafka_tls import assert_one_line_exit_2, assert_secured_replay_is_exact, cli

CLIENT_ID, CLIENT_SECRET = "funnel-kpi", "client-secret-123"
EXTENSIONS = {"logicalCluster": "lkc-test", "identityPoolId": "pool-test"}
AWS_KEY_ID, AWS_SECRET = "AKIDFUNNELTEST", "aws-secret-456"


class TokenEndpoint:
    """An OAuth 2.0 token endpoint (client-credentials grant) on loopback: random opaque tokens
    with ``expires_in``; a wrong client gets 401 ``invalid_client``."""

    def __init__(self, lifetime: int = 3600) -> None:
        self.lifetime = lifetime
        self.issued: dict[str, float] = {}  # token → expiry (epoch s)
        self.requests: list[dict[str, str]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                form = {k: v[0] for k, v in parse_qs(
                    self.rfile.read(int(self.headers["Content-Length"])).decode()).items()}
                endpoint.requests.append(form)
                if (form.get("grant_type"), form.get("client_id"), form.get("client_secret")) != (
                        "client_credentials", CLIENT_ID, CLIENT_SECRET):
                    self.answer(401, {"error": "invalid_client", "error_description": "bad client"})
                    return
                token = secrets.token_urlsafe(24)
                endpoint.issued[token] = time.time() + endpoint.lifetime
                self.answer(200, {"access_token": token, "token_type": "Bearer",
                                  "expires_in": endpoint.lifetime})

            def answer(self, status: int, body: dict) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/oauth2/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def check(self, token: str, extensions: dict[str, str]) -> str | None:
        """The broker's validator: a live token of this issuer, with the cluster's extensions."""
        if self.issued.get(token, 0) > time.time() and extensions == EXTENSIONS:
            return CLIENT_ID
        return None


def msk_iam_principal(token: str, secret_keys: dict[str, str], region: str = "eu-west-1") -> str | None:
    """What MSK checks of an IAM token: a SigV4 presigned ``kafka-cluster:Connect`` GET for this
    region, signed with the access key's secret, not expired. The access key id, or None."""
    try:
        url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except ValueError:
        return None
    parts = urlsplit(url)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    signature = params.pop("X-Amz-Signature", "")
    params.pop("User-Agent", None)  # added after signing
    access_key, date, signed_region, service, _ = params["X-Amz-Credential"].split("/")
    signed_at = time.mktime(time.strptime(params["X-Amz-Date"], "%Y%m%dT%H%M%SZ")) - time.timezone
    if (params.get("Action") != "kafka-cluster:Connect" or signed_region != region
            or parts.netloc != f"kafka.{region}.amazonaws.com" or access_key not in secret_keys
            or time.time() > signed_at + int(params["X-Amz-Expires"])):
        return None
    query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(params.items()))
    canonical = "\n".join(["GET", parts.path or "/", query, f"host:{parts.netloc}\n", "host",
                           hashlib.sha256(b"").hexdigest()])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", params["X-Amz-Date"],
                         f"{date}/{signed_region}/{service}/aws4_request",
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_keys[access_key]).encode()
    for part in (date, signed_region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return access_key if hmac.compare_digest(expected, signature) else None


def oauth_env(broker_url: str, endpoint: TokenEndpoint, secret: str = CLIENT_SECRET,
              extensions: dict[str, str] = EXTENSIONS) -> dict[str, str]:
    return {"FUNNEL_BROKER": broker_url, "FUNNEL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "FUNNEL_KAFKA_SASL_MECHANISM": "OAUTHBEARER", "FUNNEL_KAFKA_OAUTH_TOKEN_URL": endpoint.url,
            "FUNNEL_KAFKA_OAUTH_CLIENT_ID": CLIENT_ID, "FUNNEL_KAFKA_OAUTH_CLIENT_SECRET": secret,
            "FUNNEL_KAFKA_OAUTH_SCOPE": "kafka",
            "FUNNEL_KAFKA_OAUTH_EXTENSIONS": ",".join(f"{k}={v}" for k, v in extensions.items()),
            "FUNNEL_KAFKA_CONNECT_TIMEOUT": "5"}


def msk_env(broker_url: str, secret: str = AWS_SECRET) -> dict[str, str]:
    return {"FUNNEL_BROKER": broker_url, "FUNNEL_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "FUNNEL_KAFKA_SASL_MECHANISM": "OAUTHBEARER", "FUNNEL_KAFKA_OAUTH_PROVIDER": "aws-msk-iam",
            "FUNNEL_KAFKA_AWS_REGION": "eu-west-1", "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": secret, "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "FUNNEL_KAFKA_CONNECT_TIMEOUT": "5"}


@pytest.fixture
def endpoint():
    token_endpoint = TokenEndpoint()
    yield token_endpoint
    token_endpoint.server.shutdown()


@pytest.fixture
def gated_broker(tmp_path):
    """Tansu behind a SASL gate whose OAUTHBEARER check the test sets (``gate.bearer``)."""
    gate_port = free_port()
    with EmbeddedBroker(gate_port, tmp_path / "broker.log", listen_port=free_port()) as broker:
        gate = SaslGate(gate_port, broker.listen_port, bearer=lambda token, extensions: None).start()
        try:
            yield broker, gate
        finally:
            gate.stop()


def test_a_client_credentials_token_is_reused_until_shortly_before_it_expires(endpoint):
    async def tokens(provider: ClientCredentialsTokens) -> list[str]:
        return [await provider.token() for _ in range(3)]

    provider = ClientCredentialsTokens(endpoint.url, CLIENT_ID, CLIENT_SECRET, "kafka", EXTENSIONS)
    assert len(set(asyncio.run(tokens(provider)))) == 1
    assert endpoint.requests == [{"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                  "client_secret": CLIENT_SECRET, "scope": "kafka"}]
    assert provider.extensions() == EXTENSIONS
    endpoint.lifetime = 1  # renewed at 80 % of a lifetime shorter than the margin
    short = ClientCredentialsTokens(endpoint.url, CLIENT_ID, CLIENT_SECRET, None, {})
    first = asyncio.run(short.token())
    time.sleep(0.9)
    assert asyncio.run(short.token()) != first


def test_a_refused_client_names_the_settings(endpoint):
    provider = ClientCredentialsTokens(endpoint.url, CLIENT_ID, "wrong", None, {})
    with pytest.raises(TokenRefused, match=r"refused the client-credentials grant \(HTTP 401: bad client\); "
                                           "check FUNNEL_KAFKA_OAUTH_CLIENT_ID"):
        asyncio.run(provider.token())


@pytest.mark.parametrize("env, message", [
    ({"FUNNEL_KAFKA_OAUTH_CLIENT_ID": None},
     "SASL OAUTHBEARER with client-credentials needs FUNNEL_KAFKA_OAUTH_CLIENT_ID"),
    ({"FUNNEL_KAFKA_OAUTH_PROVIDER": "aws-msk-iam"},
     "FUNNEL_KAFKA_OAUTH_PROVIDER=aws-msk-iam needs FUNNEL_KAFKA_AWS_REGION"),
    ({"FUNNEL_KAFKA_OAUTH_CLIENT_SECRET_FILE": "/run/secrets/x"},
     "both FUNNEL_KAFKA_OAUTH_CLIENT_SECRET and FUNNEL_KAFKA_OAUTH_CLIENT_SECRET_FILE are set"),
    ({"FUNNEL_KAFKA_OAUTH_EXTENSIONS": "logicalCluster"}, "'logicalCluster' is not key=value"),
])
def test_incomplete_oauth_settings_are_one_line(endpoint, env, message):
    settings = {key.removeprefix("FUNNEL_KAFKA_").lower(): value
                for key, value in {**oauth_env("127.0.0.1:9", endpoint), **env}.items()
                if key.startswith("FUNNEL_KAFKA_") and value is not None}
    with pytest.raises(ValueError, match=message):
        KafkaSecurity(**settings)


@pytest.mark.broker
def test_dataset_replay_with_oauth_client_credentials_gives_the_literal_values(
        gated_broker, endpoint, tmp_path):
    broker, gate = gated_broker
    gate.bearer = endpoint.check
    secret = tmp_path / "oauth-client-secret"
    secret.write_text(CLIENT_SECRET + "\n")
    env = {**oauth_env(broker.url, endpoint), "FUNNEL_KAFKA_OAUTH_CLIENT_SECRET": "",
           "FUNNEL_KAFKA_OAUTH_CLIENT_SECRET_FILE": str(secret)}
    assert_secured_replay_is_exact(broker.url, tmp_path, "oauth", env)
    # Faust's clients, the batch loop's consumer and producer, the topic admin, the API's reader
    # and the replay's producer each log in on their own connections, with one token per process.
    assert len(gate.logins) >= 6 and set(gate.logins) == {("OAUTHBEARER", CLIENT_ID, True)}
    assert len(endpoint.requests) <= 3, endpoint.requests  # the worker's start-up check, worker, replay


@pytest.mark.broker
def test_a_token_the_broker_does_not_trust_and_a_refused_client_are_one_line(
        gated_broker, endpoint, tmp_path):
    broker, gate = gated_broker
    gate.bearer = endpoint.check
    data = {"FUNNEL_DATA_DIR": str(tmp_path / "data")}
    wrong_cluster = oauth_env(broker.url, endpoint, extensions={**EXTENSIONS, "logicalCluster": "lkc-other"})
    line = assert_one_line_exit_2(cli(["worker"], {**wrong_cluster, **data}, timeout=60), "Kafka at")
    assert f"refused SASL OAUTHBEARER login with the token from {endpoint.url}" in line
    assert gate.logins and not any(accepted for _, _, accepted in gate.logins)
    refused = oauth_env(broker.url, endpoint, secret="wrong")
    line = assert_one_line_exit_2(cli(["worker"], {**refused, **data}, timeout=60),
                                  f"the OAuth token endpoint {endpoint.url} refused")
    assert "check FUNNEL_KAFKA_OAUTH_CLIENT_ID, FUNNEL_KAFKA_OAUTH_CLIENT_SECRET(_FILE)" in line


@pytest.mark.broker
def test_msk_iam_tokens_from_aws_signer_log_in_and_a_wrong_key_is_one_line(gated_broker, tmp_path):
    broker, gate = gated_broker
    gate.bearer = lambda token, extensions: msk_iam_principal(token, {AWS_KEY_ID: AWS_SECRET})
    sent = cli(["replay", str(DATASET), "--partitions", "4"], msk_env(broker.url), timeout=180)
    assert sent.returncode == 0, sent.stderr
    assert gate.logins and set(gate.logins) == {("OAUTHBEARER", AWS_KEY_ID, True)}
    gate.logins.clear()
    line = assert_one_line_exit_2(
        cli(["worker"], {**msk_env(broker.url, secret="not-the-key"),
                         "FUNNEL_DATA_DIR": str(tmp_path / "data")}, timeout=60), "Kafka at")
    assert "refused SASL OAUTHBEARER login with the MSK IAM token for eu-west-1" in line
    assert gate.logins and not any(accepted for _, _, accepted in gate.logins)
