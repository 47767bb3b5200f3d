"""The embedded broker behind a real TLS terminator (Debian's ``stunnel4``), with a throwaway CA.

Tansu listens in plaintext on one loopback port and advertises the terminator's port, so every
client (bootstrap and metadata-driven reconnects alike) speaks TLS to stunnel, which verifies
nothing and forwards to Tansu. Certificates come from the ``openssl`` CLI: a CA, and a server
certificate for ``127.0.0.1``/``localhost`` signed by it, so hostname verification stays on.
Used by tests/test_kafka_tls.py and by the plaintext-vs-TLS comparison in bench/tls.py.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from streams.tools.broker import EmbeddedBroker, _die_with_parent, free_port, wait_for_port

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(folder: Path, name: str = "ca") -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=funnel-kpi test {name}")
    return cert, key


def make_server_cert(folder: Path, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and localhost signed by ``ca``: (certificate, key)."""
    cert, key, csr, ext = (folder / "server.pem", folder / "server.key", folder / "server.csr",
                           folder / "server.ext")
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def create(cls, folder: Path) -> TlsFiles:
        ca = make_ca(folder)
        cert, key = make_server_cert(folder, ca)
        return cls(ca[0], cert, key)


class TlsBroker(EmbeddedBroker):
    """Tansu on a private port + stunnel on :attr:`port` (the one clients use and Tansu advertises)."""

    def __init__(self, files: TlsFiles, workdir: Path) -> None:
        super().__init__(log_path=workdir / "broker.log", listen_port=free_port())
        self.files = files
        self.workdir = workdir
        self.stunnel: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        """The client settings for this broker."""
        return {"FUNNEL_BROKER": self.url, "FUNNEL_KAFKA_SECURITY_PROTOCOL": "SSL",
                "FUNNEL_KAFKA_SSL_CAFILE": str(self.files.ca)}

    def start(self) -> TlsBroker:
        if STUNNEL is None:
            raise RuntimeError("stunnel4 is not installed (apt-get install stunnel4)")
        config = self.workdir / "stunnel.conf"
        config.write_text(
            "foreground = yes\npid =\nsyslog = no\ndebug = warning\n"
            f"output = {self.workdir / 'stunnel.log'}\n"
            "[kafka]\n"
            f"accept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{self.listen_port}\n"
            f"cert = {self.files.server_cert}\nkey = {self.files.server_key}\n"
        )
        self.stunnel = subprocess.Popen([STUNNEL, str(config)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        super().start()
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self.stunnel is not None and self.stunnel.poll() is None:
            self.stunnel.terminate()
            try:
                self.stunnel.wait(timeout)
            except subprocess.TimeoutExpired:
                self.stunnel.kill()
                self.stunnel.wait()
