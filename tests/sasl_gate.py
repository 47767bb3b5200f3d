"""A SASL gate in front of the embedded broker: SCRAM for the SCRAM tests, OAUTHBEARER for the
OAuth and MSK IAM tests.

Why not Tansu's own ``--authentication``: the shipped Tansu 0.6.0 binary has one storage engine
("Storage engines: dynostore", printed by ``--help``), and there
``upsert_user_scram_credential`` is a no-op and ``user_scram_credential`` always answers None
(tansu-storage/src/dynostore.rs at v0.6.0). No user can be provisioned, so every SCRAM login
fails; ``tansu user create`` itself is refused (NotAuthenticated). The tests use that broker for
the refusals and this gate for a login that succeeds.

The gate is a real SCRAM-SHA-256/512 server (RFC 5802/7677, as Kafka runs it: SaslHandshake v0/v1
then SaslAuthenticate v0/v1 frames). Before a client has authenticated it answers only
ApiVersions (relayed to the broker), SaslHandshake and SaslAuthenticate, and closes the
connection on anything else, like a broker with ``sasl.enabled.mechanisms``; a wrong proof gets
SASL_AUTHENTICATION_FAILED (58). OAUTHBEARER (RFC 7628, KIP-255) is offered when the gate is
given a ``bearer`` check: it reads the client's ``auth=Bearer <token>`` and SASL extensions and
asks the check, as a broker asks its token validator. Once authenticated, bytes flow to and from
the broker untouched. The broker advertises the gate's port, so every client connection goes
through it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import struct
import threading
from collections.abc import Callable

API_VERSIONS, SASL_HANDSHAKE, SASL_AUTHENTICATE = 18, 17, 36
UNSUPPORTED_SASL_MECHANISM, SASL_AUTHENTICATION_FAILED = 33, 58
HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}


def _string(data: bytes, at: int) -> tuple[str | None, int]:
    (length,) = struct.unpack_from(">h", data, at)
    if length < 0:
        return None, at + 2
    return data[at + 2:at + 2 + length].decode(), at + 2 + length


def _encode_string(text: str | None) -> bytes:
    if text is None:
        return struct.pack(">h", -1)
    raw = text.encode()
    return struct.pack(">h", len(raw)) + raw


def _encode_bytes(raw: bytes) -> bytes:
    return struct.pack(">i", len(raw)) + raw


class ScramServer:
    """One SCRAM exchange (server side) for the user this gate knows."""

    def __init__(self, mechanism: str, user: str, password: str, iterations: int = 4096) -> None:
        self.mechanism = mechanism
        self.hash = HASHES[mechanism]
        self.user = user
        self.salt = os.urandom(16)
        self.iterations = iterations
        self.salted = hashlib.pbkdf2_hmac(self.hash, password.encode(), self.salt, iterations)
        self.first_bare = self.server_first = ""
        self.nonce = ""

    def _hmac(self, key: bytes, message: str | bytes) -> bytes:
        raw = message.encode() if isinstance(message, str) else message
        return hmac.new(key, raw, self.hash).digest()

    def first(self, message: str) -> str:
        self.first_bare = message.split(",", 2)[2]  # drop the GS2 header "n,,"
        fields = dict(part.split("=", 1) for part in self.first_bare.split(","))
        self.nonce = fields["r"] + base64.b64encode(os.urandom(18)).decode()
        self.server_first = (f"r={self.nonce},s={base64.b64encode(self.salt).decode()},"
                             f"i={self.iterations}")
        self.login = fields["n"]
        return self.server_first

    def final(self, message: str) -> str | None:
        """The server-final message, or None if the proof (or the user) is wrong."""
        without_proof, _, proof = message.rpartition(",p=")
        fields = dict(part.split("=", 1) for part in without_proof.split(","))
        if self.login != self.user or fields.get("r") != self.nonce:
            return None
        auth_message = f"{self.first_bare},{self.server_first},{without_proof}"
        client_key_stored = hashlib.new(self.hash, self._hmac(self.salted, "Client Key")).digest()
        signature = self._hmac(client_key_stored, auth_message)
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        if not hmac.compare_digest(hashlib.new(self.hash, client_key).digest(), client_key_stored):
            return None
        server_signature = self._hmac(self._hmac(self.salted, "Server Key"), auth_message)
        return "v=" + base64.b64encode(server_signature).decode()


class OAuthBearerServer:
    """One OAUTHBEARER exchange: the client's first message carries the token and extensions."""

    mechanism = "OAUTHBEARER"
    first_bare = ""

    def __init__(self, check: Callable[[str, dict[str, str]], str | None]) -> None:
        self.check = check  # (token, extensions) → the principal, or None to refuse
        self.login = ""

    def final(self, message: str) -> str | None:
        fields = dict(part.split("=", 1) for part in message.split("\x01")[1:] if "=" in part)
        token = fields.pop("auth", "").removeprefix("Bearer ")
        principal = self.check(token, fields)
        self.login = principal or token[:12]
        return None if principal is None else ""


class SaslGate:
    """Listens on ``port`` (loopback), forwards authenticated connections to ``upstream_port``:
    SCRAM for ``user``/``password``, and OAUTHBEARER when a ``bearer`` check is given."""

    def __init__(self, port: int, upstream_port: int, user: str = "", password: str = "",
                 bearer: Callable[[str, dict[str, str]], str | None] | None = None) -> None:
        self.port = port
        self.upstream_port = upstream_port
        self.user = user
        self.password = password
        self.bearer = bearer
        self.mechanisms = [*HASHES, "OAUTHBEARER"] if bearer else list(HASHES)
        self.logins: list[tuple[str, str, bool]] = []  # (mechanism, user, accepted)
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sasl-gate", daemon=True)
        self.server: asyncio.base_events.Server | None = None

    def start(self) -> SaslGate:
        self.thread.start()
        if not self.ready.wait(10):
            raise RuntimeError("SASL gate did not start")
        return self

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.ready.set()
        self.loop.run_forever()
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            if await self._authenticate(reader, writer, upstream_reader, upstream_writer):
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for stream in (writer, upstream_writer):
                stream.close()

    async def _authenticate(self, reader, writer, upstream_reader, upstream_writer) -> bool:
        scram: ScramServer | OAuthBearerServer | None = None
        while True:
            frame = await _read_frame(reader)
            api_key, version, correlation = struct.unpack_from(">hhi", frame)
            if api_key == API_VERSIONS:
                upstream_writer.write(struct.pack(">i", len(frame)) + frame)
                writer.write(_frame(await _read_frame(upstream_reader)))
                continue
            _, at = _string(frame, 8)  # client id
            if api_key == SASL_HANDSHAKE:
                mechanism, _ = _string(frame, at)
                known = mechanism in self.mechanisms
                scram = (OAuthBearerServer(self.bearer) if mechanism == "OAUTHBEARER" and self.bearer
                         else ScramServer(mechanism, self.user, self.password) if known else None)
                body = struct.pack(">h", 0 if known else UNSUPPORTED_SASL_MECHANISM) + struct.pack(
                    ">i", len(self.mechanisms)) + b"".join(map(_encode_string, self.mechanisms))
                writer.write(_response(correlation, body))
                if version == 0 and isinstance(scram, ScramServer):  # tokens follow without Kafka headers
                    return await self._raw_tokens(scram, mechanism, reader, writer)
                continue
            if api_key != SASL_AUTHENTICATE or scram is None:
                return False  # not authenticated: the connection is closed, as a broker does
            (length,) = struct.unpack_from(">i", frame, at)
            token = frame[at + 4:at + 4 + length].decode()
            if isinstance(scram, ScramServer) and not scram.first_bare:
                writer.write(_auth_response(correlation, version, 0, None, scram.first(token).encode()))
                continue
            answer = scram.final(token)
            self.logins.append((scram.mechanism, scram.login, answer is not None))
            if answer is None:
                refusal = ("Authentication failed during authentication due to invalid credentials "
                           f"with SASL mechanism {scram.mechanism}")
                writer.write(_auth_response(correlation, version, SASL_AUTHENTICATION_FAILED, refusal, b""))
                await writer.drain()
                return False
            writer.write(_auth_response(correlation, version, 0, None, answer.encode()))
            return True

    async def _raw_tokens(self, scram, mechanism, reader, writer) -> bool:
        writer.write(_frame(scram.first((await _read_frame(reader)).decode()).encode()))
        answer = scram.final((await _read_frame(reader)).decode())
        self.logins.append((mechanism, scram.login, answer is not None))
        if answer is None:
            return False
        writer.write(_frame(answer.encode()))
        return True


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    return await reader.readexactly(size)


def _frame(payload: bytes) -> bytes:
    return struct.pack(">i", len(payload)) + payload


def _response(correlation: int, body: bytes) -> bytes:
    return _frame(struct.pack(">i", correlation) + body)


def _auth_response(correlation: int, version: int, error: int, message: str | None, token: bytes) -> bytes:
    body = struct.pack(">h", error) + _encode_string(message) + _encode_bytes(token)
    if version >= 1:
        body += struct.pack(">q", 0)  # session lifetime: no re-authentication
    return _response(correlation, body)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()
