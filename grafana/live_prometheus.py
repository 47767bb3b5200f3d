"""Run a real Prometheus against a metrics endpoint and evaluate board queries through its API.

Used by tests/test_ops_live.py (end-to-end) and grafana/document.py (docs/dashboards.md).
Standard library only; needs the `prometheus` binary (Debian package `prometheus`, 2.42).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RULE_FILES = sorted((REPO / "prometheus" / "rules").glob("*.yml"))
DASHBOARD_DIR = REPO / "grafana" / "dashboards"
JOB = "funnel-kpi"  # = prometheus/prometheus.yml; alert rules select up{job="funnel-kpi"}

# Grafana's built-in variables, replaced by fixed values outside Grafana.
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def substitute(text: str, values: dict[str, str]) -> str:
    """Replace $name, ${name} and [[name]] by values[name] (board and built-in variables)."""
    allv = {**BUILTINS, **values}

    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return allv.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, text)


BOARD_ORDER = ["funnel-overview", "funnel-velocity", "funnel-revenue", "funnel-leaks", "funnel-dimensions"]


def load_boards() -> list[dict]:
    """Every board JSON, in reading order (overview first)."""
    boards = [json.loads(p.read_text()) for p in sorted(DASHBOARD_DIR.glob("*.json"))]
    rank = {uid: i for i, uid in enumerate(BOARD_ORDER)}
    return sorted(boards, key=lambda b: (rank.get(b["uid"], len(rank)), b["uid"]))


def board_targets(board: dict) -> Iterator[tuple[dict, dict]]:
    """(panel, target) for every query of every panel, rows included."""
    for panel in board["panels"]:
        for sub in [panel, *panel.get("panels", [])]:
            for target in sub.get("targets", []):
                yield sub, target


# Recorded only while the boards hold the last complete KPIs during a rebalance (absent when the
# KPIs are current): never expected to have data outside one.
HOLD_ONLY = ("fleet:funnel_kpis_held:age_seconds",)


def recording_rules() -> list[str]:
    """Every recording rule that has data while the KPIs are current (HOLD_ONLY left out)."""
    import yaml  # only the callers that need rule names import PyYAML

    names = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            names += [r["record"] for r in group["rules"] if "record" in r and r["record"] not in HOLD_ONLY]
    return names


class LivePrometheus:
    """A throw-away Prometheus (tmp dir, free port, 1s scrape and rule interval).

    ``metrics_url`` is one static target; with ``targets_file`` the targets come from that
    file instead (file-based service discovery, ``write_targets``), so a test can add and remove
    workers the way an orchestrator's discovery would.
    """

    def __init__(self, metrics_url: str, workdir: Path, *, interval: str = "1s",
                 targets_file: Path | None = None):
        self.metrics_url = metrics_url
        self.targets_file = targets_file
        self.workdir = Path(workdir)
        self.interval = interval
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.at: float | None = None  # the time instant queries are answered at (None: now)

    def config(self) -> str:
        u = urllib.parse.urlsplit(self.metrics_url)
        rules = "\n".join(f"  - {json.dumps(str(p))}" for p in RULE_FILES)
        return (
            "global:\n"
            f"  scrape_interval: {self.interval}\n"
            f"  evaluation_interval: {self.interval}\n"
            "rule_files:\n"
            f"{rules}\n"
            "scrape_configs:\n"
            f"  - job_name: {JOB}\n"
            f"    scheme: {u.scheme or 'http'}\n"
            f"    metrics_path: {json.dumps(u.path or '/metrics')}\n"
            + (
                "    file_sd_configs:\n"
                f"      - files: [{json.dumps(str(self.targets_file))}]\n"
                "        refresh_interval: 1s\n"
                if self.targets_file else
                "    static_configs:\n"
                f"      - targets: [{json.dumps(u.netloc)}]\n"
            )
        )

    def write_targets(self, netlocs: list[str]) -> None:
        """Replace the discovered targets (``host:port``) at once (rename: never half a file)."""
        partial = self.targets_file.with_suffix(".partial")
        partial.write_text(json.dumps([{"targets": netlocs}]))
        partial.replace(self.targets_file)

    def __enter__(self) -> LivePrometheus:
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus binary not found (apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(self.config())
        self.log = open(self.workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={cfg}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "GOMAXPROCS": "2"},
        )
        try:
            self._wait(lambda: self._get("/-/ready", raw=True) is not None, 30, "ready")
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    # ------------------------------------------------------------------ HTTP API
    def _get(self, path: str, params: dict | None = None, raw: bool = False):
        url = self.url + path + ("?" + urllib.parse.urlencode(params, doseq=True) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = resp.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.tail_log()}") from None
            return None
        return body if raw else json.loads(body)

    def tail_log(self) -> str:
        try:
            return (self.workdir / "prometheus.log").read_text()[-2000:]
        except OSError:
            return ""

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query, at ``at`` or the pinned time (:meth:`pin`) or now; raises on a PromQL
        error."""
        at = at if at is not None else self.at
        data = self._get("/api/v1/query", {"query": expr, **({"time": f"{at:.3f}"} if at else {})})
        if data is None or data.get("status") != "success":
            raise RuntimeError(f"query failed: {expr!r}: {data}")
        result = data["data"]
        if result["resultType"] == "scalar":
            return [{"metric": {}, "value": result["result"]}]
        return result["result"]

    def raw_samples(self, selector: str, start: float, end: float) -> list[dict]:
        """Every sample stored for ``selector`` from ``start`` to ``end`` (Unix seconds) as
        written, not resampled to steps: the series of a range selector at ``end``."""
        seconds = math.ceil(end - start) + 1
        data = self._get("/api/v1/query", {"query": f"{selector}[{seconds}s]", "time": f"{end:.3f}"})
        if data is None or data.get("status") != "success":
            raise RuntimeError(f"query failed: {selector!r}: {data}")
        return [dict(r, values=[(float(t), float(v)) for t, v in r["values"] if float(t) >= start])
                for r in data["data"]["result"]]

    def value(self, expr: str) -> float:
        result = self.query(expr)
        if len(result) != 1:
            raise AssertionError(f"{expr!r}: expected one series, got {len(result)}: {result}")
        return float(result[0]["value"][1])

    def label_values(self, label: str, match: str) -> list[str]:
        data = self._get(f"/api/v1/label/{label}/values", {"match[]": match})
        return data["data"] if data else []

    def alerts(self) -> list[dict]:
        data = self._get("/api/v1/alerts")
        return data["data"]["alerts"] if data else []

    # ------------------------------------------------------------------ waiting
    def _wait(self, predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise TimeoutError(f"prometheus: {what} not reached in {timeout}s\n{self.tail_log()}")

    def wait_scraped(self, timeout: float = 60) -> None:
        """The target is up and at least a few scrapes and rule evaluations happened."""
        self._wait(
            lambda: any(float(r["value"][1]) == 1 for r in self.query(f'up{{job="{JOB}"}}')),
            timeout,
            f"up{{job={JOB!r}}} == 1",
        )
        # rate()/deriv() over the board interval need several samples of metrics and rules
        self._wait(
            lambda: (
                self.query(f'count_over_time(up{{job="{JOB}"}}[1m])')
                and float(self.query(f'count_over_time(up{{job="{JOB}"}}[1m])')[0]["value"][1]) >= 5
            ),
            timeout,
            "5 scrapes",
        )

    def pin(self, timeout: float = 60) -> None:
        """Answer every later query as of one moment after five seconds of successful scrapes:
        with a 1 s scrape interval (so a 1 s scrape timeout) a loaded box can miss a scrape,
        which empties every series and exact rule for a moment, wherever a test happens to be."""
        def pinned() -> bool:
            at = time.time() - 1
            up = self.query(f'min_over_time(up{{job="{JOB}"}}[5s])', at=at)
            if up and all(float(r["value"][1]) == 1 for r in up):
                self.at = at
            return self.at is not None
        self._wait(pinned, timeout, "five seconds of successful scrapes")

    def wait_rules(self, names: list[str], timeout: float = 60) -> list[str]:
        """Wait until every recording rule has data; return the ones that still have none."""
        missing = list(names)

        def check() -> bool:
            nonlocal missing
            missing = [n for n in missing if not self.query(n)]
            return not missing

        with contextlib.suppress(TimeoutError):
            self._wait(check, timeout, "all recording rules have data")
        return missing
