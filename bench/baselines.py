"""Frozen settings of the two baselines and of the validity check.

Written once and not tuned since: a baseline that is tuned after the fact stops being a yardstick.
Both baselines use their library defaults except where the issue names a value (memory store,
~6 s session/rebalance timeouts so group joins take ~3 s, the topic's partition count).
Changing anything here makes results.json files incomparable: bump ``VERSION`` if you must.
"""

from __future__ import annotations

VERSION = 1

# The topic layout every contender reads (the tests use the same count).
PARTITIONS = 4

# Ceiling: a raw aiokafka consumer with manual assignment, library defaults for fetching,
# orjson.loads on every value; the median of REPEATS full passes over the backlog.
CEILING = {
    "fetch_max_wait_ms": 500,          # aiokafka default
    "fetch_max_bytes": 52_428_800,     # aiokafka default
    "max_partition_fetch_bytes": 1_048_576,  # aiokafka default
    "getmany_timeout_ms": 1000,
    "repeats": 3,
}

# Naive Faust, the textbook program: a topic with Faust's JSON value serializer (orjson when
# installed), one agent ``async for event in stream: deals[event["deal_id"]] = event`` (one
# table update, so one changelog message, per event), memory store, Faust defaults otherwise.
NAIVE = {
    "app_id": "bench-naive",
    "store": "memory://",
    "session_timeout_s": 6.0,
    "rebalance_timeout_s": 6.0,
    "heartbeat_s": 2.0,
    "table_partitions": PARTITIONS,
}

# The funnel-kpi worker's group settings in the bench match the naive app's.
WORKER_ENV = {
    "FUNNEL_PARTITIONS": str(PARTITIONS),
    "FUNNEL_SESSION_TIMEOUT": "6",
    "FUNNEL_REBALANCE_TIMEOUT": "6",
    "FUNNEL_LOG_LEVEL": "warning",
}

# A run is INVALID (the machine or broker is not the one the targets were set on) unless:
CEILING_MIN_EVENTS_PER_S = 150_000
NAIVE_EVENTS_PER_S_RANGE = (1_500, 5_000)
