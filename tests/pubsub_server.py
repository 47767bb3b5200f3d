"""A local stand-in for Salesforce's OAuth token endpoint and Pub/Sub API (tests only).

:class:`PubSubServer` implements ``Subscribe``, ``GetSchema`` and ``GetTopic`` of the official
proto (the generated servicer, over TLS) as the Pub/Sub API documents them: the ``accesstoken``,
``instanceurl`` and ``tenantid`` headers on every call; the first ``FetchRequest`` names the
topic and the replay start (``LATEST``, ``EARLIEST``, ``CUSTOM`` after a replay id); events are
sent only while the client has asked for them (``num_requested`` adds up, at most ``batch`` per
response, ``pending_num_requested`` says what is left); an empty response with the latest replay
id is the keep-alive when there is nothing to send; Avro-encoded payloads with the id of their
schema; a replay id out of retention is ``INVALID_ARGUMENT`` with the error code
``sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted``. Scripted faults: a stream
dropped (``UNAVAILABLE``) after a number of events, a pause between responses.

Change events are published in the streaming API's JSON form (field names in ``changedFields``,
dates as text), the form the existing adapter and fixtures use; :func:`avro_record` turns one
into the Pub/Sub form (bitmaps, epoch ms, doubles) independently of the code under test.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import grpc
import jwt
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from streams.crm.pubsub import pubsub_api_pb2 as pb2
from streams.crm.pubsub.rpc import service_handler
from streams.tools.broker import free_port

ORG = "00DSM000000Ab1X2AK"
USER = "005SM000000146PYAQ"
CLIENT_ID = "3MVG9-funnel-kpi-test-consumer-key"
CLIENT_SECRET = "client-secret-4711"
USERNAME = "integration@funnel.example"
AUTH_ERROR = "sfdc.platform.eventbus.grpc.service.auth.error"
REPLAY_CORRUPTED = "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"
TOPIC_NOT_FOUND = "sfdc.platform.eventbus.grpc.service.topic.not.found"

HEADER = {
    "type": "record",
    "name": "ChangeEventHeader",
    "namespace": "com.sforce.eventbus",
    "fields": [
        {"name": "entityName", "type": "string"},
        {"name": "recordIds", "type": {"type": "array", "items": "string"}},
        {
            "name": "changeType",
            "type": {
                "type": "enum",
                "name": "ChangeType",
                "namespace": "com.sforce.eventbus",
                "symbols": [
                    "CREATE",
                    "UPDATE",
                    "DELETE",
                    "UNDELETE",
                    "GAP_CREATE",
                    "GAP_UPDATE",
                    "GAP_DELETE",
                    "GAP_UNDELETE",
                    "GAP_OVERFLOW",
                    "SNAPSHOT",
                ],
            },
        },
        {"name": "changeOrigin", "type": "string"},
        {"name": "transactionKey", "type": "string"},
        {"name": "sequenceNumber", "type": "int"},
        {"name": "commitTimestamp", "type": "long"},
        {"name": "commitNumber", "type": "long"},
        {"name": "commitUser", "type": "string"},
        {"name": "nulledFields", "type": {"type": "array", "items": "string"}},
        {"name": "diffFields", "type": {"type": "array", "items": "string"}},
        {"name": "changedFields", "type": {"type": "array", "items": "string"}},
    ],
}


def login_env(keys: dict[str, Any], oauth: OAuthServer, pubsub: PubSubServer) -> dict[str, str]:
    """``funnel-kpi salesforce-cdc``'s settings for these servers: a JWT bearer login as the
    test's connected app and integration user, the org and the Pub/Sub endpoint."""
    return {
        "FUNNEL_SALESFORCE_LOGIN_URL": oauth.url,
        "FUNNEL_SALESFORCE_CLIENT_ID": CLIENT_ID,
        "FUNNEL_SALESFORCE_USERNAME": USERNAME,
        "FUNNEL_SALESFORCE_PRIVATE_KEY_FILE": str(keys["jwt"]),
        "FUNNEL_SALESFORCE_CA_BUNDLE": str(keys["cert"]),
        "FUNNEL_SALESFORCE_PUBSUB_URL": pubsub.url,
        "FUNNEL_SALESFORCE_ORG_ID": ORG,
    }


def _optional(name: str, kind: Any) -> dict[str, Any]:
    return {"name": name, "type": ["null", kind], "default": None}


# As GetSchema returns them: ChangeEventHeader first, then the object's fields, each optional.
OPPORTUNITY_SCHEMA = {
    "type": "record",
    "name": "OpportunityChangeEvent",
    "namespace": "com.sforce.eventbus",
    "fields": [
        {"name": "ChangeEventHeader", "type": HEADER, "doc": "Data:ChangeEventHeader"},
        *[
            _optional(name, kind)
            for name, kind in [
                ("AccountId", "string"),
                ("IsPrivate", "boolean"),
                ("Name", "string"),
                ("Description", "string"),
                ("StageName", "string"),
                ("Amount", "double"),
                ("Probability", "double"),
                ("ExpectedRevenue", "double"),
                ("CloseDate", "long"),
                ("Type", "string"),
                ("IsClosed", "boolean"),
                ("IsWon", "boolean"),
                ("ForecastCategory", "string"),
                ("ForecastCategoryName", "string"),
                ("CurrencyIsoCode", "string"),
                ("CampaignId", "string"),
                ("HasOpportunityLineItem", "boolean"),
                ("OwnerId", "string"),
                ("CreatedDate", "long"),
                ("CreatedById", "string"),
                ("LastModifiedDate", "long"),
                ("LastModifiedById", "string"),
            ]
        ],
    ],
}
NAME = {
    "type": "record",
    "name": "Switchable_PersonName",
    "fields": [
        _optional("Salutation", "string"),
        _optional("FirstName", "string"),
        _optional("LastName", "string"),
    ],
}
ADDRESS = {
    "type": "record",
    "name": "Address",
    "fields": [
        _optional("Street", "string"),
        _optional("City", "string"),
        _optional("PostalCode", "string"),
        _optional("Country", "string"),
    ],
}
LEAD_SCHEMA = {
    "type": "record",
    "name": "LeadChangeEvent",
    "namespace": "com.sforce.eventbus",
    "fields": [
        {"name": "ChangeEventHeader", "type": HEADER, "doc": "Data:ChangeEventHeader"},
        _optional("Name", NAME),
        _optional("Title", "string"),
        _optional("Company", "string"),
        _optional("Address", ADDRESS),
        _optional("Status", "string"),
        _optional("OwnerId", "string"),
        _optional("LeadSource", "string"),
        _optional("IsConverted", "boolean"),
        _optional("ConvertedDate", "long"),
        _optional("ConvertedAccountId", "string"),
        _optional("ConvertedContactId", "string"),
        _optional("ConvertedOpportunityId", "string"),
        _optional("CreatedDate", "long"),
        _optional("LastModifiedDate", "long"),
    ],
}
SCHEMAS = {"/data/OpportunityChangeEvent": OPPORTUNITY_SCHEMA, "/data/LeadChangeEvent": LEAD_SCHEMA}


def _epoch_ms(value: Any) -> Any:
    if isinstance(value, str):
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
        ts = ts if ts.tzinfo else ts.replace(tzinfo=UTC)
        return round(ts.timestamp() * 1000)
    return value


def _bitmaps(schema: dict[str, Any], names: list[str]) -> list[str]:
    """Field names → the Pub/Sub bitmaps: one ``0x…`` for top-level fields, ``n-0x…`` per compound."""
    fields = [field["name"] for field in schema["fields"]]
    top, nested = 0, {}
    for name in names:
        parent, dot, child = name.partition(".")
        if not dot:
            top |= 1 << fields.index(name)
            continue
        index = fields.index(parent)
        record = next(k for k in schema["fields"][index]["type"] if isinstance(k, dict))
        nested[index] = nested.get(index, 0) | 1 << [f["name"] for f in record["fields"]].index(child)
    out = [hex(top)] if top or nested else []
    return out + [f"{index}-{hex(bits)}" for index, bits in sorted(nested.items())]


def avro_record(schema: dict[str, Any], doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A change event in the streaming API's JSON form → (the Avro record to encode, the event the
    subscriber should write back: the record with its bitmaps as names)."""
    if "data" in doc:
        doc = doc["data"]["payload"]
    header = dict(doc["ChangeEventHeader"])
    header.setdefault("changeOrigin", "com/salesforce/api/soap/62.0;client=SfdcInternalAPI/")
    header.setdefault("commitNumber", header["commitTimestamp"] * 1000 + 433)
    header.setdefault("commitUser", USER)
    names = {key: list(header.get(key) or []) for key in ("nulledFields", "diffFields", "changedFields")}
    record: dict[str, Any] = {
        "ChangeEventHeader": {**header, **{k: _bitmaps(schema, v) for k, v in names.items()}}
    }
    for field in schema["fields"][1:]:
        value = doc.get(field["name"])
        kinds = field["type"][1]
        if isinstance(kinds, dict):  # a compound field: its parts, nested or (as some JSON has them) flat
            parts = value if isinstance(value, dict) else doc
            value = {f["name"]: parts.get(f["name"]) for f in kinds["fields"]}
            value = value if any(v is not None for v in value.values()) else None
        elif kinds == "long":
            value = _epoch_ms(value)
        elif kinds == "double" and value is not None:
            value = float(value)
        record[field["name"]] = value
    expected = {**record, "ChangeEventHeader": {**record["ChangeEventHeader"], **names}}
    return record, expected


class PubSubServer:
    def __init__(
        self,
        cert: Path,
        key: Path,
        *,
        org: str = ORG,
        batch: int = 3,
        keepalive: float = 1.0,
        pause: float = 0.0,
    ) -> None:
        self.org = org
        self.batch, self.keepalive, self.pause = batch, keepalive, pause
        self.tokens: dict[str, float] = {}  # valid access token -> expiry (time.monotonic)
        self.topics = {name: f"schema-{i}-{uuid.uuid4().hex[:8]}" for i, name in enumerate(SCHEMAS)}
        self.schemas = {self.topics[name]: schema for name, schema in SCHEMAS.items()}
        self.parsed = {
            sid: fastavro.parse_schema(json.loads(json.dumps(s))) for sid, s in self.schemas.items()
        }
        self.log: dict[str, list[tuple[int, pb2.ProducerEvent]]] = {name: [] for name in SCHEMAS}
        self.retained_from: dict[str, int] = dict.fromkeys(SCHEMAS, 0)
        self.next_replay = 1000
        self.drops: dict[str, list[int]] = {}  # topic -> drop its next stream after this many events
        self.subscribes: list[pb2.FetchRequest] = []  # each stream's first request
        self.requested: list[int] = []  # every num_requested received
        self.schema_calls = 0
        self.expected: list[dict[str, Any]] = []  # what the subscriber should write, in order
        self.cond = threading.Condition()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=24))
        self.server.add_generic_rpc_handlers((service_handler(self),))
        credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        self.port = self.server.add_secure_port(f"127.0.0.1:{free_port()}", credentials)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> PubSubServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(grace=None)

    # ------------------------------------------------------------------ publishing
    def publish(self, topic: str, doc: dict[str, Any]) -> int:
        schema_id = self.topics[topic]
        record, expected = avro_record(self.schemas[schema_id], doc)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.parsed[schema_id], record)
        with self.cond:
            replay = self.next_replay
            self.next_replay += 1
            event = pb2.ProducerEvent(id=str(uuid.uuid4()), schema_id=schema_id, payload=buf.getvalue())
            self.log[topic].append((replay, event))
            self.expected.append(expected)
            self.cond.notify_all()
        return replay

    def expire_before(self, topic: str, replay: int) -> None:
        with self.cond:
            self.retained_from[topic] = replay

    # ------------------------------------------------------------------ RPCs
    def _authenticate(self, context: grpc.ServicerContext) -> None:
        md = dict(context.invocation_metadata())
        expiry = self.tokens.get(md.get("accesstoken", ""))
        if (
            expiry is None
            or expiry < time.monotonic()
            or md.get("tenantid", "")[:15] != self.org[:15]
            or not md.get("instanceurl")
        ):
            context.set_trailing_metadata((("error-code", AUTH_ERROR),))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "Authentication exception: invalid session or org")

    def GetTopic(self, request, context):
        self._authenticate(context)
        if request.topic_name not in self.topics:
            context.set_trailing_metadata((("error-code", TOPIC_NOT_FOUND),))
            context.abort(grpc.StatusCode.NOT_FOUND, f"Topic not found: {request.topic_name}")
        return pb2.TopicInfo(
            topic_name=request.topic_name,
            tenant_guid=self.org,
            can_publish=True,
            can_subscribe=True,
            schema_id=self.topics[request.topic_name],
            rpc_id="rpc-topic",
        )

    def GetSchema(self, request, context):
        self._authenticate(context)
        self.schema_calls += 1
        if request.schema_id not in self.schemas:
            context.abort(grpc.StatusCode.NOT_FOUND, "schema not found")
        return pb2.SchemaInfo(
            schema_json=json.dumps(self.schemas[request.schema_id]), schema_id=request.schema_id
        )

    def Subscribe(self, request_iterator, context):
        self._authenticate(context)
        first = next(request_iterator)
        topic = first.topic_name
        with self.cond:
            self.subscribes.append(first)
            self.requested.append(first.num_requested)
            if topic not in self.log:
                context.set_trailing_metadata((("error-code", TOPIC_NOT_FOUND),))
                context.abort(grpc.StatusCode.NOT_FOUND, f"Topic not found: {topic}")
            log = self.log[topic]
            retained = [i for i, (replay, _) in enumerate(log) if replay >= self.retained_from[topic]]
            start = retained[0] if retained else len(log)
            if first.replay_preset == pb2.ReplayPreset.CUSTOM:
                replay = int.from_bytes(first.replay_id, "big")
                known = {r: i for i, (r, _) in enumerate(log)}
                if replay not in known or replay < self.retained_from[topic]:
                    context.set_trailing_metadata((("error-code", REPLAY_CORRUPTED),))
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        "The Replay ID validation failed. Ensure that the replay_id field value in "
                        "FetchRequest is valid and refers to an event that is within the retention "
                        "window. rpcId: rpc-subscribe",
                    )
                position = known[replay] + 1
            elif first.replay_preset == pb2.ReplayPreset.EARLIEST:
                position = start
            else:
                position = len(log)
            state = {"credit": first.num_requested, "position": position}
            drops = self.drops.get(topic)
            drop = drops.pop(0) if drops else None

        def read_requests() -> None:
            try:
                for request in request_iterator:
                    with self.cond:
                        state["credit"] += request.num_requested
                        self.requested.append(request.num_requested)
                        self.cond.notify_all()
            except grpc.RpcError:
                pass

        threading.Thread(target=read_requests, daemon=True).start()
        delivered = 0
        while context.is_active():
            with self.cond:
                log = self.log[topic]
                self.cond.wait_for(
                    lambda: state["credit"] > 0 and state["position"] < len(self.log[topic]), self.keepalive
                )
                position = state["position"]
                n = min(state["credit"], self.batch, len(log) - position)
                if drop is not None:
                    n = min(n, drop - delivered)
                chosen = log[position : position + n] if n > 0 else []
                position += len(chosen)
                state["position"] = position
                state["credit"] -= len(chosen)
                latest = log[position - 1][0].to_bytes(8, "big") if position else b""
                response = pb2.FetchResponse(
                    events=[
                        pb2.ConsumerEvent(event=event, replay_id=replay.to_bytes(8, "big"))
                        for replay, event in chosen
                    ],
                    latest_replay_id=latest,
                    rpc_id="rpc-subscribe",
                    pending_num_requested=state["credit"],
                )
            delivered += len(chosen)
            yield response
            if drop is not None and delivered >= drop:  # (abort() after a yield reads as INTERNAL)
                context.set_code(grpc.StatusCode.UNAVAILABLE)
                context.set_details("stream dropped (test fault)")
                return
            if chosen and self.pause:
                time.sleep(self.pause)


class OAuthServer:
    """``POST /services/oauth2/token``: the JWT bearer flow (RS256 assertion checked against the
    connected app's certificate key) and the client-credentials flow; tokens become valid for
    ``pubsub`` for ``lifetime`` seconds."""

    def __init__(self, pubsub: PubSubServer, public_key: bytes, tls: Any, lifetime: float = 3600.0) -> None:
        self.pubsub = pubsub
        self.public_key = public_key
        self.lifetime = lifetime
        self.issued = 0
        self.org = pubsub.org
        self.server = HTTPServer(host="127.0.0.1", port=free_port(), ssl_context=tls, threaded=True)
        self.server.expect_request("/services/oauth2/token", method="POST").respond_with_handler(self._token)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server.port}"

    def __enter__(self) -> OAuthServer:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.clear()
        self.server.stop()

    def _refuse(self, error: str, description: str) -> Response:
        return Response(
            json.dumps({"error": error, "error_description": description}),
            400,
            content_type="application/json",
        )

    def _token(self, request: Request) -> Response:
        form = request.form
        if form.get("grant_type") == "urn:ietf:params:oauth:grant-type:jwt-bearer":
            try:
                claims = jwt.decode(
                    form.get("assertion", ""),
                    self.public_key,
                    algorithms=["RS256"],
                    audience=self.url,
                    issuer=CLIENT_ID,
                )
            except jwt.PyJWTError:
                return self._refuse("invalid_grant", "invalid assertion")
            if claims.get("sub") != USERNAME:
                return self._refuse("invalid_grant", "user hasn't approved this consumer")
        elif form.get("grant_type") == "client_credentials":
            if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
                return self._refuse("invalid_client", "invalid client credentials")
        else:
            return self._refuse("unsupported_grant_type", "grant type not supported")
        self.issued += 1
        token = f"{self.org[:15]}!AQ-test-token-{self.issued}-{uuid.uuid4().hex[:8]}"
        self.pubsub.tokens[token] = time.monotonic() + self.lifetime
        return Response(
            json.dumps(
                {
                    "access_token": token,
                    "scope": "api",
                    "instance_url": "https://funnel-test.my.salesforce.com",
                    "id": f"https://login.salesforce.com/id/{self.org}/{USER}",
                    "token_type": "Bearer",
                    "issued_at": str(int(time.time() * 1000)),
                }
            ),
            200,
            content_type="application/json",
        )
