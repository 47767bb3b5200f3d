"""Start-up of ``funnel-kpi salesforce-cdc``: the gRPC channel to the Pub/Sub API, the
``GetTopic`` check of every CDC channel, and the one-line refusals (exit 2).

Apart from the streams because nothing here retries: credentials Salesforce refuses, a token of
another org than ``FUNNEL_SALESFORCE_ORG_ID``, a channel ``GetTopic`` does not know or does not
allow, are fixed by the operator, and said before anything else is logged.
"""

from __future__ import annotations

import logging

import grpc

from streams.crm.pubsub import pubsub_api_pb2 as pb2
from streams.crm.pubsub.auth import AuthRefused, Tokens
from streams.crm.pubsub.rpc import PubSubStub
from streams.crm.pubsub.settings import CdcSettings
from streams.kafka.startup import StartupError

log = logging.getLogger("funnel_kpi.salesforce_cdc")
# HTTP/2 pings keep NAT and proxies from dropping a quiet stream (Salesforce sends its own
# keep-alive response within 270 s); pings only while a call is open, as gRPC servers allow.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.max_receive_message_length", 64 << 20),
]


def open_channel(cdc: CdcSettings) -> grpc.aio.Channel:
    """The TLS channel to the Pub/Sub API (``FUNNEL_SALESFORCE_CA_BUNDLE`` or the system CAs)."""
    root = cdc.salesforce_ca_bundle.read_bytes() if cdc.salesforce_ca_bundle else None
    return grpc.aio.secure_channel(
        cdc.salesforce_pubsub_url,
        grpc.ssl_channel_credentials(root_certificates=root),
        options=CHANNEL_OPTIONS,
    )


async def check_channels(stub: PubSubStub, tokens: Tokens, cdc: CdcSettings) -> None:
    """``GetTopic`` for every channel: it exists, this user may subscribe, it is this org's.
    Nothing is logged before every check passed: a refusal is the one line of the command."""
    found = []
    for name in cdc.channels:
        token = await tokens.current()
        try:
            topic = await stub.GetTopic(
                pb2.TopicRequest(topic_name=name), metadata=token.metadata(), timeout=30
            )
        except grpc.aio.AioRpcError as exc:
            raise StartupError(refusal(exc, name, cdc)) from None
        if topic.tenant_guid and topic.tenant_guid[:15] != token.org_id[:15]:
            raise AuthRefused(
                f"the Pub/Sub API answers for org {topic.tenant_guid}, the token is of org "
                f"{token.org_id}: check FUNNEL_SALESFORCE_PUBSUB_URL and the login URL"
            )
        if not topic.can_subscribe:
            raise StartupError(
                f"the user may not subscribe to {name}: give it Read on the object (CDC "
                "events need the entity's read permission) and View All Data or "
                "access to the records"
            )
        found.append(f"{name} (schema {topic.schema_id})")
    token = tokens.token
    log.info(
        "salesforce: logged in to org %s (%s); channels %s",
        token.org_id,
        token.instance_url,
        ", ".join(found),
    )


def error_code(exc: grpc.aio.AioRpcError) -> str:
    """Salesforce's own error code, in the ``error-code`` trailer."""
    for key, value in exc.trailing_metadata() or ():
        if key == "error-code":
            return value if isinstance(value, str) else value.decode()
    return ""


def refusal(exc: grpc.aio.AioRpcError, channel: str, cdc: CdcSettings) -> str:
    """The one line for a ``GetTopic`` the API refused."""
    code, detail = exc.code(), exc.details() or ""
    where = f"{error_code(exc)}: {detail}".strip(": ")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            f"the Salesforce Pub/Sub API refused the access token ({where}): check the connected app's "
            "OAuth scopes (api) and the user's API Enabled permission"
        )
    if code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
    ):
        return (
            f"unknown or forbidden channel {channel} ({where}): select the object for Change Data Capture "
            "in Setup (or name an existing custom channel) and check FUNNEL_SALESFORCE_CHANNELS"
        )
    return (
        f"cannot reach the Salesforce Pub/Sub API at {cdc.salesforce_pubsub_url} ({code.name}: {detail}); "
        "check FUNNEL_SALESFORCE_PUBSUB_URL and FUNNEL_SALESFORCE_CA_BUNDLE"
    )
