"""Optional Redis sink (``FUNNEL_REDIS_URL``): latest snapshot per pipeline, leaderboard,
KPIs per dimension value, customer lifetime values, alert stream.

Redis is never on the agents' path: they only hand over the latest snapshot (older ones are
dropped) and append alerts to a bounded queue; a background task writes with retries and
backoff, counts failures, and catches up with the latest snapshot when Redis is back.

Keys (``<prefix>`` = ``funnel``):
- ``<prefix>:kpis:<pipeline>``: the snapshot JSON;
- ``<prefix>:leaderboard:<pipeline>``: sorted set, member = owner, score = won revenue;
- ``<prefix>:teams:<pipeline>``: sorted set, member = team, score = won revenue (only when the
  funnel config gives reps a team: the snapshot's ``teams``);
- ``<prefix>:dimensions:<pipeline>``: hash, field = dimension, value = JSON of its values (only
  when the funnel config names dimensions: the snapshot's ``dimensions``);
- ``<prefix>:clv:<pipeline>``: hash, field = account, value = lifetime value (top customers);
- ``<prefix>:alerts``: stream of alert JSON (field ``alert``), capped at about 10,000 entries.
A snapshot's keys are replaced by one script, atomically (readers never see two mixed), and only
if its ``(generation, sequence)`` is greater than the stored snapshot's: a previous publisher's
writes, held while Redis was down, or an old fleet's beside a rebuild, may land after newer ones.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import orjson
import redis.asyncio as aioredis

from models.alerts import Alert
from models.snapshot import KpiSnapshot

log = logging.getLogger("funnel_kpi.redis")
ALERT_STREAM_LEN = 10_000
PENDING_ALERTS = 10_000
# KEYS: kpis, leaderboard, clv, teams, dimensions. ARGV: snapshot JSON, generation, sequence,
# number of leaderboard rows, then score/member pairs, number of team rows, then score/member
# pairs, number of dimensions, then field/value pairs, then field/value pairs of the lifetime
# values. 1 if written.
# A stored value that is no snapshot (unreadable, no pair) is replaced.
WRITE_IF_NEWER = """
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, old = pcall(cjson.decode, stored)
  if ok and type(old) == 'table' and type(old.generation) == 'number'
      and type(old.sequence) == 'number' then
    local generation, sequence = tonumber(ARGV[2]), tonumber(ARGV[3])
    if generation < old.generation
        or (generation == old.generation and sequence <= old.sequence) then
      return 0
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
local function section(key, command, count_at)
  local last = count_at + 2 * tonumber(ARGV[count_at])
  if last > count_at then redis.call(command, key, unpack(ARGV, count_at + 1, last)) end
  return last
end
local teams_at = section(KEYS[2], 'ZADD', 4) + 1
local dimensions_at = section(KEYS[4], 'ZADD', teams_at) + 1
local clv_at = section(KEYS[5], 'HSET', dimensions_at) + 1
if #ARGV >= clv_at then redis.call('HSET', KEYS[3], unpack(ARGV, clv_at)) end
return 1
"""


class RedisSink:
    def __init__(self, url: str, on_error, prefix: str = "funnel") -> None:
        self.client = aioredis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.write_if_newer = self.client.register_script(WRITE_IF_NEWER)
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
        board = [arg for row in snapshot.leaderboard for arg in (row.won_revenue, row.owner)]
        teams = [arg for row in snapshot.teams or () for arg in (row.won_revenue, row.team)]
        dimensions = [arg for name, rows in (snapshot.dimensions or {}).items()
                      for arg in (name, orjson.dumps([row.model_dump() for row in rows]))]
        values = [arg for c in snapshot.customers.top for arg in (c.account, c.lifetime_value)]
        await self.write_if_newer(
            keys=[p % "kpis", p % "leaderboard", p % "clv", p % "teams", p % "dimensions"],
            args=[snapshot.model_dump_json(), snapshot.generation, snapshot.sequence,
                  len(snapshot.leaderboard), *board, len(teams) // 2, *teams,
                  len(dimensions) // 2, *dimensions, *values],
        )

    async def close(self) -> None:
        await self.client.aclose()
