"""Fuzz the HTTP receiver: random methods, paths, headers and bodies, signed or not, never get a
5xx or crash it, and only authenticated, well-formed webhooks are stored."""

from __future__ import annotations

import base64
import http.client
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.crm.sources import hubspot
from streams.tools.broker import EmbeddedBroker

from .test_ingest_e2e import BASIC, SECRET, Edge, read

pytestmark = pytest.mark.broker
HEADER_NAMES = [
    "X-HubSpot-Signature-v3",
    "X-HubSpot-Request-Timestamp",
    "X-HubSpot-Signature",
    "X-HubSpot-Signature-Version",
    "Authorization",
    "Content-Type",
    "Content-Encoding",
    "X-Forwarded-Proto",
    "X-Forwarded-Host",
    "X-Custom",
]
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=80
)
json_docs = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
bodies = st.binary(max_size=2000) | json_docs.map(lambda d: json.dumps(d).encode())


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    with EmbeddedBroker(log_path=tmp_path_factory.mktemp("fuzz") / "broker.log") as broker:
        running = Edge(broker.url, bridge=False, ingest_max_body=4096).start()
        running.stored = 0
        yield running
        running.stop()
        assert (
            len(read(broker.url, "crm.raw.hubspot")) + len(read(broker.url, "crm.raw.pipedrive"))
            == running.stored
        )


def send(edge: Edge, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", edge.sources.ingest_port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT", "DELETE", "OPTIONS"]),
    path=st.sampled_from(
        [
            "/webhooks/hubspot",
            "/webhooks/pipedrive",
            "/healthz",
            "/metrics",
            "/",
            "/webhooks/hubspot?x=%3A",
            "/webhooks/%2e%2e/x",
            "/webhooks/pipedrive/",
        ]
    ),
    headers=st.dictionaries(st.sampled_from(HEADER_NAMES), header_values, max_size=5),
    body=bodies,
    auth=st.sampled_from(["none", "none", "hubspot", "pipedrive"]),
)
def test_random_requests_never_get_a_5xx(edge, method, path, headers, body, auth):
    if auth == "hubspot":  # correctly signed: the body itself is what is fuzzed
        ts = str(int(time.time() * 1000))
        headers = {
            "X-HubSpot-Request-Timestamp": ts,
            "X-HubSpot-Signature-v3": hubspot.signature_v3(SECRET, method, edge.url(path), body, ts),
        }
    elif auth == "pipedrive":
        headers = {**headers, "Authorization": "Basic " + base64.b64encode(BASIC.encode()).decode()}
    status = send(edge, method, path, headers, body)
    assert status < 500, (status, method, path, headers, body[:100])
    if status == 204 and path.startswith("/webhooks/") and body.strip() != b"[]":
        edge.stored += 1
    assert send(edge, "GET", "/healthz", {}, b"") == 200  # still alive
