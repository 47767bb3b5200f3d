"""The contenders as real OS processes: the funnel-kpi worker and the naive Faust app.

Like ``tests/conftest.WorkerProcess`` (not imported: tests/ is not a library), plus the cheap
probes the bench polls: event totals, readiness and RSS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from bench import measure
from bench.baselines import WORKER_ENV
from models.kpis import Samples, parse_exposition, total
from streams.tools.broker import free_port

ROOT = Path(__file__).resolve().parents[1]


def http_get(url: str, timeout: float = 5.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except OSError:
        return None


class Proc:
    """A subprocess with an HTTP port, logging to ``<workdir>/<name>.log``, run from the
    source tree ``root`` (another checkout's, to compare two versions side by side)."""

    # SIGTERM → exit: a worker flushing a large RocksDB state may need a while.
    stop_timeout = 60.0

    def __init__(self, argv: list[str], workdir: Path, name: str, env: dict[str, str],
                 root: Path = ROOT) -> None:
        self.argv = argv
        self.name = name
        self.root = root
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        self.data_dir = workdir / f"data-{name}"
        self.env = {**os.environ, **env}
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.started_wall = 0.0  # time.time() at start, to place the worker's log lines

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> Proc:
        log = self.log_path.open("ab")
        self.started_at = time.monotonic()
        self.started_wall = time.time()
        self.process = subprocess.Popen(self.argv, cwd=self.root, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT)
        return self

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def rss_bytes(self) -> int:
        """Resident set size from /proc (same source as prometheus-client's process metric)."""
        with open(f"/proc/{self.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FunnelWorker(Proc):
    """``funnel-kpi worker``; counts come from ``funnel_events_total`` on ``/metrics``."""

    def __init__(self, broker_url: str, workdir: Path, name: str = "funnel", *,
                 data_dir: Path | None = None, root: Path = ROOT, **env: str) -> None:
        super().__init__([sys.executable, "-m", "streams.tools.cli", "worker"], workdir, name, {}, root)
        self.data_dir = data_dir or self.data_dir
        self.env.update({
            **WORKER_ENV,
            "FUNNEL_BROKER": broker_url,
            "FUNNEL_WEB_PORT": str(self.port),
            "FUNNEL_WEB_BIND": "127.0.0.1",
            "FUNNEL_DATA_DIR": str(self.data_dir),
            **env,
        })

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def samples(self, timeout: float = 5.0) -> Samples | None:
        raw = http_get(self.url, timeout)
        return parse_exposition(raw.decode()) if raw is not None else None

    def count(self) -> int | None:
        """``funnel_events_total`` without parsing the whole exposition (polled fast)."""
        raw = http_get(self.url)
        return measure.events_total(raw) if raw is not None else None

    def ready(self) -> bool:
        samples = self.samples()
        return bool(samples) and total(samples, "funnel_worker_ready") == 1

    def metric(self, name: str, timeout: float = 5.0, **match: str) -> float | None:
        samples = self.samples(timeout)
        return total(samples, name, **match) if samples else None

    def wait_for(self, name: str, target: float, timeout: float, poll: float = 0.2) -> float:
        """Seconds from process start until the metric ``name`` reaches ``target`` (scrapes of
        a worker recovering a large state are slow: each may take up to 30 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            value = self.metric(name, timeout=30)
            if value is not None and value >= target:
                return time.monotonic() - self.started_at
            time.sleep(poll)
        raise TimeoutError(f"{self.name}: {name} did not reach {target} in {timeout:.0f}s "
                           f"(last {self.metric(name, timeout=30)})")


class NaiveApp(Proc):
    """``python -m bench.naive_app``; counts come from ``GET /count``."""

    def __init__(self, broker_url: str, workdir: Path, name: str = "naive", *,
                 table: bool = True) -> None:
        super().__init__([sys.executable, "-m", "bench.naive_app"], workdir, name, {})
        self.env.update({
            "BENCH_BROKER": broker_url,
            "BENCH_WEB_PORT": str(self.port),
            "BENCH_DATA_DIR": str(self.data_dir),
            "BENCH_APP_ID": f"bench-{name}",
            "BENCH_TABLE": "1" if table else "0",
        })

    def count(self) -> int | None:
        raw = http_get(f"http://127.0.0.1:{self.port}/count")
        return int(orjson.loads(raw)["count"]) if raw is not None else None
