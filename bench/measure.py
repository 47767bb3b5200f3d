"""How figures are taken: draining a backlog, steady-rate latency, percentiles.

Throughput (naive and funnel-kpi alike): the events are produced before the process starts;
the process is polled and the rate is the events counted between the first poll that shows
progress and the first poll that shows all of them, over the time between those polls.
Start-up, group join and recovery are so excluded (and reported apart). A funnel-kpi scrape
costs the worker 25–150 ms of CPU (more with more open deals), so polls are 0.5 s apart and
only quicken (20 ms) when the rate so far says the end is under a second away: the end is timed
to ~20 ms, cheaply.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.kafka.client import client_args

COUNTER_PREFIX = b"funnel_events_total{"


def events_total(exposition: bytes) -> int:
    """Sum of ``funnel_events_total`` in a text exposition, without a full parse (polled fast)."""
    count = 0.0
    for line in exposition.splitlines():
        if line.startswith(COUNTER_PREFIX):
            count += float(line.rsplit(b" ", 1)[1])
    return int(count)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc, any process we can see)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), to spot other load."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Drain:
    events: int          # events counted inside the timed window
    seconds: float       # first poll with progress → first poll with everything
    startup_s: float     # process start → first poll with progress
    cpu_s: tuple[float, ...] = ()  # CPU seconds of each watched process inside the window
    foreign_cores: float = 0.0     # busy cores not explained by the watched processes + bench

    @property
    def rate(self) -> float:
        return self.events / self.seconds

    def cpu_us_per_event(self) -> tuple[float, ...]:
        return tuple(1e6 * cpu / self.events for cpu in self.cpu_s)


def drain(count: Callable[[], int | None], expected: int, started_at: float,
          alive: Callable[[], None], *, timeout: float, slow: float = 0.5,
          fast: float = 0.02, pids: tuple[int, ...] = ()) -> Drain:
    """Poll ``count`` until it reaches ``expected`` (see the module docstring); ``pids``:
    processes whose CPU time inside the window is reported (the contender, the broker)."""
    deadline = time.monotonic() + timeout
    first: tuple[float, int] | None = None
    cpu_first: list[float] = []
    while True:
        alive()
        value = count()
        now = time.monotonic()
        if value is not None and value > 0 and first is None:
            first = (now, value)
            cpu_first = [cpu_seconds(pid) for pid in (*pids, os.getpid())]
            busy_first = system_busy_seconds()
        if value is not None and value >= expected:
            break
        if now > deadline:
            raise TimeoutError(f"counted {value} of {expected} events in {timeout:.0f}s")
        interval = slow
        if first is not None and value is not None and value > first[1]:
            rate = (value - first[1]) / (now - first[0])
            if (expected - value) / rate < 2 * slow:
                interval = fast
        time.sleep(interval)
    if value > expected:
        raise RuntimeError(f"counted {value} events, expected {expected}")
    assert first is not None
    if first[1] >= expected:
        raise RuntimeError("the whole backlog went between two polls: use more events")
    cpu = [cpu_seconds(pid) - before for pid, before in zip((*pids, os.getpid()), cpu_first,
                                                             strict=True)]
    foreign = max(0.0, system_busy_seconds() - busy_first - sum(cpu)) / (now - first[0])
    return Drain(expected - first[1], now - first[0], first[0] - started_at, tuple(cpu[:-1]),
                 foreign)


async def raw_consume(broker_url: str, topic: str, partitions: int, expected: int,
                      settings: dict) -> float:
    """The ceiling: assign every partition, read from the start, orjson-decode each value.

    Timed from the first fetch after assignment to the last event decoded; returns events/s.
    """
    import orjson

    consumer = AIOKafkaConsumer(
        **client_args(broker_url), enable_auto_commit=False, auto_offset_reset="earliest",
        fetch_max_wait_ms=settings["fetch_max_wait_ms"], fetch_max_bytes=settings["fetch_max_bytes"],
        max_partition_fetch_bytes=settings["max_partition_fetch_bytes"],
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        loads = orjson.loads
        decoded = 0
        started = time.monotonic()
        while decoded < expected:
            batches = await consumer.getmany(timeout_ms=settings["getmany_timeout_ms"])
            if not batches and time.monotonic() - started > 60:
                raise TimeoutError(f"ceiling read {decoded} of {expected} events")
            for messages in batches.values():
                for message in messages:
                    loads(message.value)
                decoded += len(messages)
        return decoded / (time.monotonic() - started)
    finally:
        await consumer.stop()


class Poller(threading.Thread):
    """Scrapes a count every ``interval`` s; keeps (asked at, answered at, count) per scrape."""

    def __init__(self, count: Callable[[], int | None], interval: float) -> None:
        super().__init__(daemon=True)
        self.count = count
        self.interval = interval
        self.points: list[tuple[float, float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            asked = time.monotonic()
            value = self.count()
            now = time.monotonic()
            if value is not None:
                self.points.append((asked, now, value))
            self.stopping.wait(max(0.0, self.interval - (now - asked)))

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def scrape_seconds(self) -> list[float]:
        return [answered - asked for asked, answered, _ in self.points]


def visibility_latencies(
    sent_at: list[float], points: list[tuple[float, float, int]], base: int
) -> tuple[list[float], list[float]]:
    """Per event i, bounds of produce → visible: (upper, lower) lists, seconds.

    Event i counts as visible once the total reaches ``base + i + 1`` (across partitions order
    is not strict; at a steady rate the error is within one batch). Upper bound: the answer of
    the first scrape showing it. Lower bound: the previous scrape was asked before it showed.
    """
    upper, lower = [], []
    j = 0
    for i, sent in enumerate(sent_at):
        need = base + i + 1
        while j < len(points) and points[j][2] < need:
            j += 1
        if j == len(points):
            break
        upper.append(points[j][1] - sent)
        lower.append(max(0.0, points[j - 1][0] - sent) if j else 0.0)
    return upper, lower


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))
    return ordered[index]
