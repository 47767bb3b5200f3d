"""The start-up broker check: reach and log in to a bootstrap server before anything starts.

Apart from the connection settings (:mod:`streams.kafka.client`) because it is the one place that
turns a failed connection into a :class:`~streams.kafka.client.BrokerUnavailable` line naming
the setting to check: a TLS handshake, a SASL login, or nothing answering in time.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka.conn import create_conn
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

from streams.kafka.client import BrokerUnavailable, KafkaSecurity, bootstrap_servers, load_security


def _quiet_probe_resets(loop: asyncio.AbstractEventLoop) -> None:
    """A probe connection reset by the listener (plaintext against a TLS port) leaves asyncio's
    stream-closed future holding the ``ConnectionResetError`` nobody reads; depending on the
    garbage collector's order at exit, asyncio reports it with a traceback on standard error,
    after the one-line refusal that already said why. Such reports are dropped; every other
    goes to the handler the loop had."""
    previous = loop.get_exception_handler()
    if getattr(previous, "quiets_probe_resets", False):
        return  # a check before this one on the same loop installed it

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if (context.get("message") == "Future exception was never retrieved"
                and isinstance(context.get("exception"), OSError)):
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    handler.quiets_probe_resets = True  # type: ignore[attr-defined]
    loop.set_exception_handler(handler)


async def check_broker(broker_url: str, security: KafkaSecurity | None = None) -> None:
    """Connect (and authenticate) to a bootstrap server before anything else starts.

    Refused or closed connections are retried until ``FUNNEL_KAFKA_CONNECT_TIMEOUT`` (a broker may still be
    starting); a TLS or SASL refusal cannot heal by waiting and fails at once. Either way the
    error is one :class:`BrokerUnavailable` line naming the setting to check. While it waits, one
    notice on standard output says so (standard error is kept for the refusal: one line).
    """
    security = security or load_security()
    args = security.aiokafka_args()
    hosts = bootstrap_servers(broker_url)
    if not hosts:
        raise BrokerUnavailable(f"FUNNEL_BROKER {broker_url!r} names no host:port")
    loop = asyncio.get_running_loop()
    _quiet_probe_resets(loop)
    deadline = loop.time() + security.connect_timeout
    last = ""
    waiting = False
    while True:
        for host in hosts:
            name, _, port = host.rpartition(":")
            try:
                await asyncio.wait_for(_ask_metadata(name or port, int(port) if name else 9092, args),
                                       max(deadline - loop.time(), 0.1))
            except ssl.SSLError as exc:
                raise BrokerUnavailable(_tls_failure(host, security, exc)) from None
            except (TimeoutError, KafkaError, OSError) as exc:
                tls_cause = _ssl_cause(exc)
                if tls_cause is not None:
                    raise BrokerUnavailable(_tls_failure(host, security, tls_cause)) from None
                if security.sasl and _refused_by_sasl(exc):
                    raise BrokerUnavailable(_sasl_failure(host, security)) from None
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except KeyError:
                # aiokafka's SCRAM client reads the server's final message without checking
                # for an error attribute (``e=``): a wrong password surfaces as KeyError 'v'.
                raise BrokerUnavailable(_sasl_failure(host, security)) from None
            else:
                return
        if loop.time() >= deadline:
            raise BrokerUnavailable(
                f"no Kafka broker reachable at {', '.join(hosts)} within {security.connect_timeout:g}s "
                f"(FUNNEL_KAFKA_CONNECT_TIMEOUT): {last}; check FUNNEL_BROKER and "
                f"FUNNEL_KAFKA_SECURITY_PROTOCOL ({security.security_protocol})"
            )
        if not waiting:
            waiting = True
            print(f"waiting for Kafka at {', '.join(hosts)} (up to {security.connect_timeout:g} s, "
                  "FUNNEL_KAFKA_CONNECT_TIMEOUT)", flush=True)
        await asyncio.sleep(min(0.5, max(deadline - loop.time(), 0)))


async def _ask_metadata(host: str, port: int, args: dict[str, Any]) -> None:
    """Connect, log in, and get an answer: a broker that demands SASL from a client that
    offers none accepts the TCP connection and only closes it at the first request."""
    conn = await create_conn(host, port, **args)
    try:
        await conn.send(MetadataRequest([]))
    finally:
        conn.close()


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _refused_by_sasl(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    return any(word in text for word in ("sasl", "authenticat"))


def _sasl_failure(host: str, security: KafkaSecurity) -> str:
    if security.oauth:
        where = (f"the MSK IAM token for {security.aws_region} (check the IAM policy allows "
                 "kafka-cluster:Connect on this cluster)" if security.oauth_provider == "aws-msk-iam"
                 else f"the token from {security.oauth_token_url} (check the broker trusts that "
                 "issuer, FUNNEL_KAFKA_OAUTH_SCOPE and FUNNEL_KAFKA_OAUTH_EXTENSIONS)")
        return f"Kafka at {host} refused SASL OAUTHBEARER login with {where}"
    return (f"Kafka at {host} refused SASL {security.sasl_mechanism} login as "
            f"{security.sasl_username!r}: check FUNNEL_KAFKA_SASL_USERNAME and "
            "FUNNEL_KAFKA_SASL_PASSWORD(_FILE)")


def _tls_failure(host: str, security: KafkaSecurity, exc: ssl.SSLError) -> str:
    reason = getattr(exc, "verify_message", None) or exc.reason or str(exc)
    return (
        f"TLS handshake with Kafka at {host} failed ({reason}): check FUNNEL_KAFKA_SSL_CAFILE "
        f"({security.ssl_cafile or 'system CAs'}), FUNNEL_KAFKA_SSL_CHECK_HOSTNAME and that the "
        "broker listens with TLS on that port"
    )
