"""One CDC channel's ``Subscribe`` stream: where it starts, flow control, and reopening it.

The first ``FetchRequest`` names the channel and where to start (``CUSTOM`` after the stored
replay id, else the configured preset), and asks for ``FUNNEL_SALESFORCE_FETCH`` events; more
are asked for when half of them have arrived (flow control: the server never sends more than was
asked for). Each response goes to the :class:`~streams.crm.pubsub.raw_writer.RawWriter`. No
message for ``FUNNEL_SALESFORCE_KEEPALIVE_TIMEOUT`` seconds, a dropped stream, an unreachable
host or a Kafka error reopen the stream from the last stored id after an exponential backoff. A
stored id the API no longer retains (``INVALID_ARGUMENT``, error code ``…replayid…``) falls back
to the configured preset, with a warning that names the backfill to run for the missed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass

import grpc
from aiokafka.errors import KafkaError

from streams.crm.pubsub import pubsub_api_pb2 as pb2
from streams.crm.pubsub.auth import AuthUnavailable, Tokens
from streams.crm.pubsub.metrics import Metrics
from streams.crm.pubsub.raw_writer import RawWriter, backfill_since
from streams.crm.pubsub.replay import ReplayStore, Stored, key_of
from streams.crm.pubsub.rpc import PubSubStub
from streams.crm.pubsub.settings import CdcSettings
from streams.crm.pubsub.startup_checks import error_code

log = logging.getLogger("funnel_kpi.salesforce_cdc")
PRESETS = {"EARLIEST": pb2.ReplayPreset.EARLIEST, "LATEST": pb2.ReplayPreset.LATEST}


class StreamEnded(Exception):
    """The server closed the stream, or sent nothing for longer than the keep-alive timeout."""


class ReplayExpired(Exception):
    pass


@dataclass
class ChannelStream:
    """One channel's stream, reopened until stop; its own fallback to the preset."""

    name: str
    cdc: CdcSettings
    stub: PubSubStub
    tokens: Tokens
    store: ReplayStore
    writer: RawWriter
    metrics: Metrics
    fallback: bool = False  # the stored id expired: start from the preset

    async def run(self, stop: asyncio.Event) -> None:
        """Reopen the stream, after a backoff, until ``stop``."""
        name = self.name
        failures = 0
        while not stop.is_set():
            reason = None
            try:
                delivered = await self.stream()
                failures = 0 if delivered else failures
                reason = "ended"
            except ReplayExpired:
                continue  # at once, from the preset
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                reason = code.name.lower()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    await self.tokens.refresh(stale=self.tokens.token)
                log.warning("salesforce: %s stream failed: %s %s", name, code.name, exc.details())
            except StreamEnded as exc:
                reason = "stalled" if "keep-alive" in str(exc) else "ended"
                log.warning("salesforce: %s: %s", name, exc)
            except KafkaError as exc:
                reason = "kafka"
                log.warning(
                    "salesforce: %s: Kafka did not take the events (%s); resubscribing from the "
                    "last stored replay id",
                    name,
                    exc,
                )
            except AuthUnavailable as exc:
                reason = "auth_unavailable"
                log.warning("salesforce: %s: %s", name, exc)
            finally:
                self.metrics.connected.labels(name).set(0)
            self.metrics.reconnects.labels(name, reason).inc()
            delay = min(self.cdc.salesforce_reconnect_max, 0.5 * 2**failures) * random.uniform(0.8, 1.2)
            failures += 1
            log.info("salesforce: reopening %s in %.1fs (%s)", name, delay, reason)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def stream(self) -> bool:
        """One Subscribe stream until it ends; True if it delivered anything."""
        name, cdc = self.name, self.cdc
        token = await self.tokens.current()
        key = key_of(token.org_id, name)
        stored = self.store.stored.get(key)
        if stored is not None and not self.fallback:
            first = pb2.FetchRequest(
                topic_name=name,
                replay_preset=pb2.ReplayPreset.CUSTOM,
                replay_id=stored.replay_id,
                num_requested=cdc.salesforce_fetch,
            )
            log.info("salesforce: %s resuming after replay id %s", name, stored.replay_id.hex())
        else:
            first = pb2.FetchRequest(
                topic_name=name,
                replay_preset=PRESETS[cdc.salesforce_replay_preset],
                num_requested=cdc.salesforce_fetch,
            )
            log.info("salesforce: %s starting at %s", name, cdc.salesforce_replay_preset)
        call = self.stub.Subscribe(metadata=token.metadata())
        delivered = False
        try:
            await call.write(first)
            wanted = cdc.salesforce_fetch
            while True:
                try:
                    response = await asyncio.wait_for(call.read(), cdc.salesforce_keepalive_timeout)
                except TimeoutError:
                    raise StreamEnded(
                        f"no message (not even a keep-alive) for {cdc.salesforce_keepalive_timeout:g}s"
                    ) from None
                except grpc.aio.AioRpcError as exc:
                    if (
                        stored is not None
                        and not self.fallback
                        and exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                        and "replayid" in error_code(exc)
                    ):
                        self._expired(stored, exc)
                        raise ReplayExpired from None
                    raise
                if response is grpc.aio.EOF:
                    raise StreamEnded("the server closed the stream")
                self.metrics.heard(name)
                if await self.writer.handle(name, key, response):
                    self.fallback = False
                delivered = delivered or bool(response.events)
                wanted = response.pending_num_requested
                if wanted <= cdc.salesforce_fetch // 2:
                    # The server may have ended the call meanwhile (a dropped stream): grpc then
                    # refuses the write, and the next read says how the call ended.
                    with contextlib.suppress(asyncio.InvalidStateError):
                        await call.write(
                            pb2.FetchRequest(topic_name=name, num_requested=cdc.salesforce_fetch - wanted)
                        )
        finally:
            call.cancel()

    def _expired(self, stored: Stored, exc: grpc.aio.AioRpcError) -> None:
        self.fallback = True
        self.metrics.fallbacks.labels(self.name).inc()
        since = backfill_since(stored.commit_timestamp)
        log.warning(
            "salesforce: the stored replay id of %s is no longer retained by Salesforce (%s); resubscribing "
            "from %s. Changes after %s may be missing: run `funnel-kpi backfill salesforce --since %s`",
            self.name,
            exc.details(),
            self.cdc.salesforce_replay_preset,
            since,
            since,
        )
