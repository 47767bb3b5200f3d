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
from pathlib import Path

# (bucket, substrings of a frame "function (file:line)"), most specific first.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("/metrics scrape (KpiCollector, generate_latest)", ("metrics_view", "generate_latest")),
    ("DLQ writes", ("to_dlq",)),
    ("credits re-key send (customer-credits topic)", ("deal_agent (streams/app.py", "credits_topic.send")),
    ("customer agent (customers table)", ("customer_agent",)),
    ("event decode + validation (orjson fast path / pydantic)", ("decode_event", "models/event.py")),
    ("deal state machine (apply_change)", ("apply_change",)),
    ("deal (de)serialisation (encode_deal / decode_deal)", ("encode_deal", "decode_deal")),
    ("contribution computation (deal_contribution)", ("deal_contribution", "_credit_of")),
    ("fold update (Fold.replace)", ("Fold.replace", "Fold.apply")),
    ("process metrics (funnel_events_total, lag histogram)", ("ProcessMetrics.counted",)),
    ("table writes + changelog send (in_event_context, Table.__setitem__)",
     ("write.<locals>.put", "in_event_context.<locals>", "__setitem__", "on_key_set")),
    ("table reads (Table.get)", ("load (streams/app.py", "read.<locals>.load")),
    ("other funnel-kpi batch code (processor, to_records, report_lag)",
     ("streams/processor.py", "to_records", "report_lag", "deal_agent")),
    ("Faust stream / take_events per-event overhead", ("faust/streams.py", "faust/agents/")),
    ("Faust consumer: fetch, dispatch to streams, offsets, commit",
     ("faust/transport/", "faust/tables/")),
    ("aiokafka producer (batching, sending changelog/credit batches)", ("aiokafka/producer",)),
    ("aiokafka consumer (fetching, record decoding)", ("aiokafka/consumer", "aiokafka/record")),
    ("aiokafka client / protocol", ("aiokafka/",)),
    ("asyncio event loop and other", ("",)),
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


def bucket_of(frames: list[str]) -> str:
    for name, needles in BUCKETS:
        for needle in needles:
            if any(needle in frame for frame in frames):
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
