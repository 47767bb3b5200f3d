"""Optional Redis sink (``FUNNEL_REDIS_URL``): latest snapshot per pipeline, leaderboard,
customer lifetime values, alert stream.

Redis is never on the agents' path: they only hand over the latest snapshot (older ones are
dropped) and append alerts to a bounded queue; a background task writes with retries and
backoff, counts failures, and catches up with the latest snapshot when Redis is back.

Keys (``<prefix>`` = ``funnel``):
- ``<prefix>:kpis:<pipeline>``: the snapshot JSON;
- ``<prefix>:leaderboard:<pipeline>``: sorted set, member = owner, score = won revenue;
- ``<prefix>:clv:<pipeline>``: hash, field = account, value = lifetime value (top customers);
- ``<prefix>:alerts``: stream of alert JSON (field ``alert``), capped at about 10,000 entries.
A snapshot's keys are replaced in one MULTI/EXEC transaction, so readers never see two mixed.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import redis.asyncio as aioredis

from models.alerts import Alert
from models.snapshot import KpiSnapshot

log = logging.getLogger("funnel_kpi.redis")
ALERT_STREAM_LEN = 10_000
PENDING_ALERTS = 10_000


class RedisSink:
    def __init__(self, url: str, on_error, prefix: str = "funnel") -> None:
        self.client = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.on_error = on_error
        self.prefix = prefix
        self.snapshots: dict[str, KpiSnapshot] = {}
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=PENDING_ALERTS)
        self.wake = asyncio.Event()
        self.healthy = True

    def snapshot(self, snapshot: KpiSnapshot) -> None:
        self.snapshots[snapshot.pipeline] = snapshot
        self.wake.set()

    def alert(self, alert: Alert) -> None:
        self.alerts.append(alert)
        self.wake.set()

    async def run(self) -> None:
        backoff = 0.5
        while True:
            await self.wake.wait()
            self.wake.clear()
            try:
                await self._flush()
                backoff = 0.5
            except (aioredis.RedisError, OSError) as exc:
                self.on_error()
                if self.healthy:
                    log.warning("Redis write failed (%s); retrying with backoff", exc)
                self.healthy = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
                self.wake.set()

    def _written(self) -> None:
        """Healthy again from the first write that works (a backlog of alerts can take a while)."""
        if not self.healthy:
            log.info("Redis is back: writing the latest snapshots and queued alerts")
        self.healthy = True

    async def _flush(self) -> None:
        while self.snapshots:
            pipeline, snapshot = next(iter(self.snapshots.items()))
            await self._write_snapshot(snapshot)
            self._written()
            if self.snapshots.get(pipeline) is snapshot:  # no newer one arrived meanwhile
                del self.snapshots[pipeline]
        while self.alerts:
            alert = self.alerts[0]
            await self.client.xadd(f"{self.prefix}:alerts",
                                   {"alert": alert.model_dump_json(exclude_none=True)},
                                   maxlen=ALERT_STREAM_LEN, approximate=True)
            self._written()
            self.alerts.popleft()

    async def _write_snapshot(self, snapshot: KpiSnapshot) -> None:
        p = f"{self.prefix}:%s:{snapshot.pipeline}"
        async with self.client.pipeline(transaction=True) as tx:
            tx.set(p % "kpis", snapshot.model_dump_json())
            tx.delete(p % "leaderboard", p % "clv")
            if snapshot.leaderboard:
                tx.zadd(p % "leaderboard", {r.owner: r.won_revenue for r in snapshot.leaderboard})
            if snapshot.customers.top:
                tx.hset(p % "clv", mapping={c.account: c.lifetime_value
                                            for c in snapshot.customers.top})
            await tx.execute()

    async def close(self) -> None:
        await self.client.aclose()
