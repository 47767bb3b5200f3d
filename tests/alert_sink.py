"""A local HTTP endpoint that records what Alertmanager (or anything) POSTs to it: the
"receiver" end of the alert path in the tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from streams.tools.broker import free_port


class AlertSink:
    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[tuple[str, dict[str, str], dict]] = []  # (path, headers, JSON body)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                sink.received.append((self.path, dict(self.headers), json.loads(body or b"{}")))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def alerts(self, path: str | None = None) -> list[dict]:
        """Every alert of every notification received (on ``path``), in arrival order."""
        return [a for p, _, body in list(self.received) if path in (None, p) for a in body.get("alerts", [])]

    def __enter__(self) -> AlertSink:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
