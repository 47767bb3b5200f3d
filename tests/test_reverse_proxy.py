"""deploy/nginx/funnel-kpi.conf with Debian's nginx: `nginx -t` with a self-signed certificate,
then the real proxy in front of the real receiver: a HubSpot v3 webhook signed for the public
https URL is accepted through it, and nothing but POST /webhooks/* gets through."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from streams.crm.sources import hubspot
from streams.tools.broker import free_port

from .conftest import wait_until
from .test_ingest_e2e import SECRET, Edge, read
from .test_sources_common import fixture, raw

REPO = Path(__file__).resolve().parent.parent
SITE = REPO / "deploy/nginx/funnel-kpi.conf"
SERVER_NAME = "crm-hooks.example.com"


def nginx() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        pytest.fail("nginx not found: make tools (Debian nginx-light)")
    return path


def configure(tmp: Path, port: int, upstream_port: int) -> Path:
    """The shipped site with this machine's certificate, listen port and receiver port, inside
    a minimal nginx.conf that runs in the foreground as the current user."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         f"/CN={SERVER_NAME}", "-keyout", key, "-out", cert],
        check=True, capture_output=True, timeout=60,
    )
    site = SITE.read_text()
    site = re.sub(r"ssl_certificate /\S+;", f"ssl_certificate {cert};", site)
    site = re.sub(r"ssl_certificate_key /\S+;", f"ssl_certificate_key {key};", site)
    site = site.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl http2;")
    site = site.replace("listen [::]:443 ssl http2;\n", "")
    site = site.replace("http://127.0.0.1:8000", f"http://127.0.0.1:{upstream_port}")
    site = re.sub(r"access_log /\S+;", f"access_log {tmp}/access.log;", site)
    (tmp / "site.conf").write_text(site)
    main = tmp / "nginx.conf"
    main.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
        "events {}\nhttp {\n"
        f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n  scgi_temp_path {tmp}/scgi;\n"
        f"  include {tmp}/site.conf;\n}}\n"
    )
    return main


def test_nginx_accepts_the_shipped_site(tmp_path):
    main = configure(tmp_path, free_port(), free_port())
    res = subprocess.run([nginx(), "-t", "-c", main, "-p", tmp_path], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert "syntax is ok" in res.stderr


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> int:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
    req = urllib.request.Request(f"https://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Host": SERVER_NAME, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_signed_hubspot_webhook_passes_the_proxy_and_nothing_else_does(broker, tmp_path):
    edge = Edge(broker.url, bridge=False).start()
    port = free_port()
    main = configure(tmp_path, port, edge.sources.ingest_port)
    log = (tmp_path / "nginx.out").open("wb")
    proxy = subprocess.Popen([nginx(), "-c", main, "-p", tmp_path], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: request(port, "GET", "/") == 404, 30, interval=0.5, what="nginx up")
        body = raw(fixture("hubspot_session.json")["bodies"][0])
        ts = str(int(time.time() * 1000))
        path = "/webhooks/hubspot?portal=62515"
        # what HubSpot signs: the public URL it called, query included
        signature = hubspot.signature_v3(SECRET, "POST", f"https://{SERVER_NAME}{path}", body, ts)
        signed = {"Content-Type": "application/json", "X-HubSpot-Signature-v3": signature,
                  "X-HubSpot-Request-Timestamp": ts}
        assert request(port, "POST", path, body, signed) == 204
        assert [r.value for r in read(broker.url, "crm.raw.hubspot")] == [body]
        # the same signature for another URL, or no signature: refused by the receiver
        assert request(port, "POST", "/webhooks/hubspot", body, signed) == 401
        # only POST /webhooks/* reaches the receiver
        assert request(port, "GET", "/webhooks/hubspot") == 403
        assert request(port, "GET", "/metrics") == 404
        assert request(port, "GET", "/healthz") == 404
        assert request(port, "POST", "/metrics", b"x") == 404
        assert request(port, "POST", "/webhooks/../metrics", b"x") == 404
    finally:
        proxy.terminate()
        proxy.wait(20)
        log.close()
        edge.stop()
