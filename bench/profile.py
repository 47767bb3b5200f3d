"""Sampling profile of a running worker with py-spy, summarised by where the time goes.

py-spy samples from outside the process (``--nonblocking``: it never pauses the worker), so the
worker runs unmodified. Each sample is put in the first bucket of :data:`BUCKETS` one of whose
frames it contains, so nested work is charged to the most specific named cost.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from itertools import pairwise
from pathlib import Path

# (bucket, needles), most specific first. A needle is a substring of a frame
# ("function (file:line)"), or "A>B": a frame with A directly calling a frame with B.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("/metrics scrape (KpiCollector, generate_latest)",
     ("metrics_view", "generate_latest", "KpiCollector", "Fold.merge")),
    ("DLQ writes", ("to_dlq",)),
    ("customer credits (customers table)", ("CustomerProcessor",)),
    ("table reads (store get)", ("RawTable.read",)),
    ("table writes (Table.__setitem__, changelog publish)",
     ("Outbox.put", "__setitem__", "on_key_set")),
    ("event decode + validation (msgspec fast path / pydantic)", ("decode_event", "models/event.py")),
    ("deal state machine (apply_change)", ("apply_change",)),
    ("deal (de)serialisation (encode_deal / decode_deal)", ("encode_deal", "decode_deal")),
    ("contribution computation (deal_contribution, credit_of)",
     ("deal_contribution", "credit_of", "customer_contribution")),
    ("fold update (Fold.replace / apply)", ("Fold.replace", "Fold.apply")),
    ("process metrics (funnel_events_total, lag histogram)",
     ("ProcessMetrics", "prometheus_client/metrics.py")),
    ("producer: batches per partition (streams/worker/outbox.py, aiokafka)",
     ("BatchProducer", "faust/transport/producer.py", "aiokafka/producer", "faust/topics.py")),
    ("batch loop: fetches, lag, positions (streams/worker/loop.py)",
     ("streams/worker/loop.py>aiokafka/consumer", "_report_lag")),
    ("Faust stream / take_events / acks", ("faust/streams.py",)),
    ("other funnel-kpi batch code (processors, batch step, batch loop)",
     ("processors/", "streams/worker/step.py", "streams/worker/loop.py")),
    ("Faust consumer + mode plumbing (fetch loop, conductor, channels, sensors, waits)",
     ("faust/transport/consumer.py", "faust/transport/conductor.py", "faust/transport/utils.py",
      "faust/agents/", "faust/channels.py", "faust/app/", "faust/sensors/", "faust/serializers/",
      "faust/events.py", "mode/utils/", "Service.wait_first")),
    ("aiokafka consumer / client (fetch, record decoding, protocol)", ("aiokafka/",)),
    ("asyncio event loop and other (C callbacks, selector)", ("",)),
]


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen:
    """Start ``py-spy record`` (raw collapsed stacks) on ``pid``; wait on the returned process."""
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed: .venv/bin/pip install py-spy")
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--rate", str(rate), "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            stack, _, count = line.rpartition(" ")
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _matches(needle: str, frames: list[str]) -> bool:
    if ">" in needle:
        caller, callee = needle.split(">", 1)
        return any(caller in a and callee in b for a, b in pairwise(frames))
    return any(needle in frame for frame in frames)


def bucket_of(frames: list[str]) -> str:
    for name, needles in BUCKETS:
        if any(_matches(needle, frames) for needle in needles):
            return name
    return BUCKETS[-1][0]


def summarise(path: Path, top: int = 15) -> dict:
    """Buckets and self-time leaders, as shares of the samples where the worker was busy."""
    stacks = load(path)
    total = sum(count for _, count in stacks) or 1
    buckets: Counter = Counter()
    leaves: Counter = Counter()
    for frames, count in stacks:
        buckets[bucket_of(frames)] += count
        leaves[frames[-1]] += count
    return {
        "samples": total,
        "buckets": [(name, round(100 * n / total, 1)) for name, n in buckets.most_common()],
        "self": [(name, round(100 * n / total, 1)) for name, n in leaves.most_common(top)],
    }


def render(summary: dict) -> str:
    lines = [f"{summary['samples']} busy samples", "", "where the time goes (buckets):"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["buckets"]]
    lines += ["", "top functions by self time:"]
    lines += [f"  {share:5.1f}%  {name}" for name, share in summary["self"]]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(summarise(Path(sys.argv[1]))))
