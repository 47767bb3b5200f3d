"""``funnel-kpi salesforce-cdc`` without a broker: header bitmaps, Avro change events → the raw JSON
the adapter reads, the generated proto code, OAuth (JWT bearer, client credentials) against a
local token endpoint, and the start-up refusals (bad token, wrong org, unknown channel)."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import fastavro
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from streams.crm.pubsub import pubsub_api_pb2 as pb2
from streams.crm.pubsub.auth import AuthRefused, Tokens, login
from streams.crm.pubsub.bitmap import BitmapError, field_names
from streams.crm.pubsub.events import Schema, Undecodable, change_event, encode, message_key, raw_message
from streams.crm.pubsub.rpc import CALLS
from streams.crm.pubsub.settings import CdcSettings
from streams.crm.sources import salesforce
from streams.tools.broker import free_port

from .conftest import ROOT
from .crm_servers import tls_files
from .pubsub_server import (
    CLIENT_ID,
    CLIENT_SECRET,
    LEAD_SCHEMA,
    OPPORTUNITY_SCHEMA,
    ORG,
    USERNAME,
    OAuthServer,
    PubSubServer,
    avro_record,
    login_env,
)
from .test_sources_common import CTX, fixture

PUBSUB = ROOT / "streams" / "crm" / "pubsub"
OPPORTUNITY = [f["name"] for f in OPPORTUNITY_SCHEMA["fields"]]


# ---------------------------------------------------------------------------------- bitmaps
def test_top_level_bitmap_bits_count_from_the_least_significant():
    # field 0 is ChangeEventHeader; StageName is field 5, Amount 6, LastModifiedDate 21
    assert OPPORTUNITY[5:7] == ["StageName", "Amount"] and OPPORTUNITY[21] == "LastModifiedDate"
    assert field_names(OPPORTUNITY_SCHEMA, ["0x60"]) == ["StageName", "Amount"]
    assert field_names(OPPORTUNITY_SCHEMA, ["0x200060"]) == ["StageName", "Amount", "LastModifiedDate"]
    assert field_names(OPPORTUNITY_SCHEMA, []) == []
    assert field_names(OPPORTUNITY_SCHEMA, ["0x0"]) == []


def test_compound_fields_use_the_parent_position_and_their_own_bitmap():
    # LeadChangeEvent: field 1 is Name {Salutation, FirstName, LastName}, field 4 Address
    assert field_names(LEAD_SCHEMA, ["0x20", "1-0x04"]) == ["Status", "Name.LastName"]
    assert field_names(LEAD_SCHEMA, ["1-0x06", "4-0x3"]) == [
        "Name.FirstName",
        "Name.LastName",
        "Address.Street",
        "Address.City",
    ]


def test_wide_objects_need_more_than_64_bits():
    schema = {
        "type": "record",
        "name": "Wide",
        "fields": [{"name": f"F{i}", "type": "string"} for i in range(300)],
    }
    assert field_names(schema, [hex(1 << 299 | 1 << 64 | 1)]) == ["F0", "F64", "F299"]


@pytest.mark.parametrize("bitmap", ["0x800000000", "0xZZ", "2-0x1", "99-0x1", "1-0x10", "StageName", "1-zz"])
def test_bitmaps_that_do_not_fit_the_schema_are_refused(bitmap):
    with pytest.raises(BitmapError):
        field_names(LEAD_SCHEMA, [bitmap])


@given(st.sets(st.sampled_from(OPPORTUNITY[1:])))
def test_any_set_of_fields_comes_back(names):
    record, _ = avro_record(
        OPPORTUNITY_SCHEMA,
        {
            "ChangeEventHeader": {
                "entityName": "Opportunity",
                "recordIds": ["006SM0000001Tb3YAE"],
                "changeType": "UPDATE",
                "transactionKey": "t",
                "sequenceNumber": 1,
                "commitTimestamp": 1,
                "changedFields": sorted(names),
            }
        },
    )
    decoded = field_names(OPPORTUNITY_SCHEMA, record["ChangeEventHeader"]["changedFields"])
    assert sorted(decoded) == sorted(names)


# ---------------------------------------------------------------------------------- events
def encoded(schema: dict, doc: dict) -> tuple[Schema, bytes, dict]:
    record, expected = avro_record(schema, doc)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(copy.deepcopy(schema)), record)
    return Schema.from_json("sid-1", json.dumps(schema)), buf.getvalue(), expected


SESSION = fixture("salesforce_session.json")["messages"]
SCHEMA_OF = {"Opportunity": OPPORTUNITY_SCHEMA, "Lead": LEAD_SCHEMA}


@pytest.mark.parametrize(
    "i",
    [
        i
        for i, m in enumerate(SESSION)
        if m.get("data", {}).get("payload", m)["ChangeEventHeader"]["entityName"] in SCHEMA_OF
    ],
)
def test_a_pubsub_event_adapts_exactly_like_its_streaming_api_form(i):
    doc = SESSION[i]
    entity = doc.get("data", {}).get("payload", doc)["ChangeEventHeader"]["entityName"]
    schema, payload, expected = encoded(SCHEMA_OF[entity], doc)
    event = change_event(schema, payload)
    assert event == expected  # bitmaps as names, the rest as Avro decodes it
    message = raw_message(f"/data/{entity}ChangeEvent", "sid-1", (4711).to_bytes(8, "big"), "uuid-1", event)
    raw = encode(message)
    assert json.loads(raw)["data"]["event"] == {"replayId": "0000000000001267", "EventUuid": "uuid-1"}
    via_pubsub, as_streamed = salesforce.adapt(raw, CTX), salesforce.adapt(json.dumps(doc).encode(), CTX)
    assert via_pubsub.events == as_streamed.events and via_pubsub.gaps == as_streamed.gaps
    assert via_pubsub.rejects == [] and via_pubsub.skipped == as_streamed.skipped
    ids = event["ChangeEventHeader"]["recordIds"]
    assert message_key(event, "/data/x") == (ids[0] if ids else "/data/x").encode()


def test_created_updated_multi_record_ids_and_times_are_the_cdc_ones():
    _, create_ab, *_ = SESSION
    schema, payload, _ = encoded(OPPORTUNITY_SCHEMA, create_ab)
    events = salesforce.adapt(
        encode(
            raw_message("/data/OpportunityChangeEvent", "sid-1", b"\x01", "u", change_event(schema, payload))
        ),
        CTX,
    ).events
    assert [e["event_id"] for e in events] == [
        "salesforce:00000466-3d4f-bbe3-9c2b-5ab0fb45cc02:1:006SM0000001Tb3YAE",
        "salesforce:00000466-3d4f-bbe3-9c2b-5ab0fb45cc02:1:006SM0000001Tb4YAE",
    ]
    assert {e["occurred_at"] for e in events} == {"2025-11-03T09:00:00.000Z"}
    assert {e["expected_close_at"] for e in events} == {"2025-12-15T00:00:00.000Z"}  # epoch ms in Avro


def test_a_payload_that_does_not_fit_its_schema_is_undecodable():
    schema, payload, _ = encoded(OPPORTUNITY_SCHEMA, SESSION[0])
    with pytest.raises(Undecodable):
        change_event(schema, payload[:10])
    not_cdc = Schema.from_json(
        "x", json.dumps({"type": "record", "name": "E", "fields": [{"name": "A", "type": "string"}]})
    )
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, not_cdc.parsed, {"A": "x"})
    with pytest.raises(Undecodable):
        change_event(not_cdc, buf.getvalue())


# ---------------------------------------------------------------------------------- proto
def test_the_generated_proto_code_is_current(tmp_path):
    # what `make proto` runs, into a scratch tree: the checked-in files must be its output
    (tmp_path / "streams" / "crm" / "pubsub").mkdir(parents=True)
    proto = "streams/crm/pubsub/pubsub_api.proto"
    (tmp_path / proto).write_bytes((ROOT / proto).read_bytes())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", proto],
        cwd=tmp_path,
        check=True,
    )
    name = "pubsub_api_pb2.py"
    assert (tmp_path / "streams/crm/pubsub" / name).read_text() == (PUBSUB / name).read_text(), (
        f"{name} is stale: run `make proto`"
    )
    assert "service PubSub" in (PUBSUB / "pubsub_api.proto").read_text()
    # the calls streams/crm/pubsub/rpc.py binds, with the messages the proto gives them
    service = pb2.DESCRIPTOR.services_by_name["PubSub"]
    for name, (kind, request, response) in CALLS.items():
        method = service.methods_by_name[name]
        assert (method.input_type.name, method.output_type.name) == (
            request.DESCRIPTOR.name, response.DESCRIPTOR.name), name
        streaming = method.client_streaming and method.server_streaming
        assert (kind == "stream_stream") == streaming, name


# ---------------------------------------------------------------------------------- OAuth
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    cert, key = tls_files(directory)
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def pem(k):
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (directory / "jwt.key").write_bytes(pem(private))
    (directory / "wrong.key").write_bytes(pem(other))
    return {
        "cert": cert,
        "key": key,
        "public": public,
        "jwt": directory / "jwt.key",
        "wrong": directory / "wrong.key",
        "dir": directory,
    }


@pytest.fixture
def servers(keys):
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(keys["cert"], keys["key"])
    with (
        PubSubServer(keys["cert"], keys["key"]) as pubsub,
        OAuthServer(pubsub, keys["public"], context) as oauth,
    ):
        yield pubsub, oauth


def cdc_settings(keys, oauth, **extra) -> CdcSettings:
    values = {
        "salesforce_login_url": oauth.url,
        "salesforce_client_id": CLIENT_ID,
        "salesforce_username": USERNAME,
        "salesforce_private_key": SecretStr(keys["jwt"].read_text()),
        "salesforce_ca_bundle": keys["cert"],
        **extra,
    }
    return CdcSettings(**values)


def test_jwt_bearer_and_client_credentials_log_in_to_the_org(keys, servers):
    pubsub, oauth = servers
    token = login(cdc_settings(keys, oauth))
    assert token.org_id == ORG and token.access_token in pubsub.tokens
    assert dict(token.metadata()) == {
        "accesstoken": token.access_token,
        "tenantid": ORG,
        "instanceurl": "https://funnel-test.my.salesforce.com",
    }
    other = login(
        cdc_settings(
            keys,
            oauth,
            salesforce_auth="client_credentials",
            salesforce_client_secret=SecretStr(CLIENT_SECRET),
            salesforce_org_id=ORG[:15],
        )
    )
    assert other.org_id == ORG and other.access_token != token.access_token


def test_refused_credentials_and_another_org_are_auth_refusals(keys, servers):
    _, oauth = servers
    with pytest.raises(AuthRefused, match="invalid_grant: invalid assertion"):
        login(cdc_settings(keys, oauth, salesforce_private_key=SecretStr(keys["wrong"].read_text())))
    with pytest.raises(AuthRefused, match="invalid_client"):
        login(
            cdc_settings(
                keys, oauth, salesforce_auth="client_credentials", salesforce_client_secret=SecretStr("nope")
            )
        )
    with pytest.raises(AuthRefused, match="not FUNNEL_SALESFORCE_ORG_ID=00DSM000000Zz9X"):
        login(cdc_settings(keys, oauth, salesforce_org_id="00DSM000000Zz9X"))


def test_tokens_are_refreshed_before_they_end(keys, servers):
    _, oauth = servers
    settings = cdc_settings(keys, oauth, salesforce_token_ttl=2.0)  # refreshed 0.5 s before its end

    async def run():
        tokens = Tokens(settings, await asyncio.to_thread(login, settings))
        first = tokens.token
        stop = asyncio.Event()
        task = asyncio.create_task(tokens.keep_fresh(stop))
        await asyncio.sleep(3.8)
        stop.set()
        await task
        return first, tokens

    started = time.monotonic()
    first, tokens = asyncio.run(run())
    assert tokens.refreshes == 2 and tokens.token is not first
    assert tokens.token.refresh_at > started + 3.8  # the current one is still fresh
    assert oauth.issued == 3


# ---------------------------------------------------------------------------------- refusals
def run_cli(keys, oauth, pubsub, **env) -> subprocess.CompletedProcess:
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FUNNEL_")},
        "FUNNEL_BROKER": f"kafka://127.0.0.1:{free_port()}",  # never reached: refused before
        **login_env(keys, oauth, pubsub),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "streams.tools.cli", "salesforce-cdc"],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def refused(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("funnel-kpi: ")
    return lines[0]


def test_a_bad_token_is_one_line_and_exit_2(keys, servers):
    pubsub, oauth = servers
    line = refused(run_cli(keys, oauth, pubsub, FUNNEL_SALESFORCE_PRIVATE_KEY_FILE=str(keys["wrong"])))
    assert "refused the jwt login" in line and "invalid_grant" in line
    assert "PRIVATE KEY" not in line  # no secret in the message
    pubsub.tokens.clear()
    oauth.pubsub = PubSubServer.__new__(PubSubServer)  # tokens issued from now on are unknown to the API
    oauth.pubsub.tokens = {}
    line = refused(run_cli(keys, oauth, pubsub))
    assert "Pub/Sub API refused the access token" in line and "auth.error" in line


def test_a_wrong_org_is_one_line_and_exit_2(keys, servers):
    pubsub, oauth = servers
    line = refused(run_cli(keys, oauth, pubsub, FUNNEL_SALESFORCE_ORG_ID="00DSM000000Zz9XAAA"))
    assert f"log in to org {ORG}, not FUNNEL_SALESFORCE_ORG_ID=00DSM000000Zz9XAAA" in line


def test_an_unknown_channel_is_one_line_and_exit_2(keys, servers):
    pubsub, oauth = servers
    line = refused(
        run_cli(
            keys,
            oauth,
            pubsub,
            FUNNEL_SALESFORCE_CHANNELS="/data/OpportunityChangeEvent,/data/QuoteChangeEvent",
        )
    )
    assert "unknown or forbidden channel /data/QuoteChangeEvent" in line and "topic.not.found" in line


def test_missing_credentials_name_the_setting(keys, servers):
    pubsub, oauth = servers
    line = refused(run_cli(keys, oauth, pubsub, FUNNEL_SALESFORCE_USERNAME=""))  # empty: unset
    assert "FUNNEL_SALESFORCE_USERNAME" in line


def test_the_proto_ships_with_the_package():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "streams.crm.pubsub" in project["packages"]
    assert project["package-data"]["streams.crm.pubsub"] == ["*.proto"]
    assert Path(pb2.__file__).parent == PUBSUB
