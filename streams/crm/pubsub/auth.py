"""OAuth 2.0 for the Pub/Sub API: the JWT bearer flow and the client-credentials flow.

Both answer ``access_token``, ``instance_url`` and ``id`` (``…/id/<org id>/<user id>``); the org
id is the tenant the Pub/Sub API's ``tenantid`` header names. Salesforce tokens carry no expiry:
they last the org's session timeout (``FUNNEL_SALESFORCE_TOKEN_TTL``, or ``expires_in`` when the
answer has one), and :class:`Tokens` fetches a new one before that, so calls never start with a
token about to end. A refusal (``invalid_grant``, ``invalid_client`` …) is :class:`AuthRefused`:
the credentials need a person; a network failure is :class:`AuthUnavailable`: retried.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import jwt
import requests

from streams.crm.pubsub.settings import CdcSettings
from streams.kafka.startup import StartupError

log = logging.getLogger("funnel_kpi.salesforce_cdc")
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_SECONDS = 180  # Salesforce accepts an assertion up to 3 minutes after it was made
TIMEOUT = 30


class AuthRefused(StartupError):
    """Salesforce refused the credentials, or they belong to another org: a person must act."""


class AuthUnavailable(Exception):
    """The token endpoint could not be reached or answered 5xx: try again later."""


@dataclass(frozen=True)
class Token:
    access_token: str
    instance_url: str
    org_id: str
    refresh_at: float  # time.monotonic()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The Pub/Sub API's authentication headers of every call."""
        return (
            ("accesstoken", self.access_token),
            ("instanceurl", self.instance_url),
            ("tenantid", self.org_id),
        )


def same_org(a: str, b: str) -> bool:
    """Org ids compare on their 15 case-sensitive characters (the 18-character form adds a checksum)."""
    return a[:15] == b[:15]


def login(settings: CdcSettings) -> Token:
    """One token from the configured flow (blocking HTTP)."""
    url = settings.salesforce_login_url.rstrip("/") + "/services/oauth2/token"
    if settings.salesforce_auth == "jwt":
        assert settings.salesforce_private_key is not None
        claims = {
            "iss": settings.salesforce_client_id,
            "sub": settings.salesforce_username,
            "aud": settings.salesforce_jwt_audience or settings.salesforce_login_url.rstrip("/"),
            "exp": int(time.time()) + ASSERTION_SECONDS,
        }
        try:
            assertion = jwt.encode(
                claims, settings.salesforce_private_key.get_secret_value(), algorithm="RS256"
            )
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise AuthRefused(
                f"FUNNEL_SALESFORCE_PRIVATE_KEY is not a usable RSA private key (PEM): {exc}"
            ) from None
        form = {"grant_type": JWT_GRANT, "assertion": assertion}
    else:
        assert settings.salesforce_client_secret is not None
        form = {
            "grant_type": "client_credentials",
            "client_id": settings.salesforce_client_id,
            "client_secret": settings.salesforce_client_secret.get_secret_value(),
        }
    verify: bool | str = str(settings.salesforce_ca_bundle) if settings.salesforce_ca_bundle else True
    started = time.monotonic()
    try:
        response = requests.post(url, data=form, timeout=TIMEOUT, verify=verify)
    except requests.exceptions.SSLError as exc:
        raise AuthRefused(f"TLS with {url} failed ({exc}); check FUNNEL_SALESFORCE_CA_BUNDLE") from None
    except requests.RequestException as exc:
        raise AuthUnavailable(f"cannot reach {url}: {exc}") from None
    if response.status_code >= 500:
        raise AuthUnavailable(f"{url} answered {response.status_code}")
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or not isinstance(body, dict) or "access_token" not in body:
        error = body.get("error", f"HTTP {response.status_code}") if isinstance(body, dict) else "no JSON"
        detail = body.get("error_description", "") if isinstance(body, dict) else ""
        who = (
            "check FUNNEL_SALESFORCE_CLIENT_ID, FUNNEL_SALESFORCE_USERNAME, the private key and that "
            "the user is pre-authorized for the connected app"
            if settings.salesforce_auth == "jwt"
            else "check FUNNEL_SALESFORCE_CLIENT_ID, FUNNEL_SALESFORCE_CLIENT_SECRET, the run-as user "
            "and that FUNNEL_SALESFORCE_LOGIN_URL is the org's My Domain"
        )
        raise AuthRefused(
            f"Salesforce refused the {settings.salesforce_auth} login at {url}: {error}"
            f"{': ' + detail if detail else ''}; {who}"
        )
    identity = str(body.get("id", "")).rstrip("/").split("/")
    if len(identity) < 2 or not identity[-2].startswith("00D"):
        raise AuthRefused(f"Salesforce's token answer from {url} names no org id (id={body.get('id')!r})")
    org_id = identity[-2]
    expected = settings.salesforce_org_id
    if expected and not same_org(org_id, expected):
        raise AuthRefused(
            f"the credentials log in to org {org_id}, not FUNNEL_SALESFORCE_ORG_ID={expected}: "
            "check the login URL, the connected app and the user"
        )
    ttl = float(body.get("expires_in") or settings.salesforce_token_ttl)
    return Token(
        str(body["access_token"]),
        str(body.get("instance_url", "")).rstrip("/"),
        org_id,
        started + ttl - min(300.0, ttl / 4),
    )


class Tokens:
    """The current token; refreshed ahead of its end, or at once after a refusal by the API."""

    def __init__(self, settings: CdcSettings, token: Token) -> None:
        self.settings = settings
        self.token = token
        self.refreshes = 0
        self._lock = asyncio.Lock()

    async def current(self) -> Token:
        if time.monotonic() >= self.token.refresh_at:
            await self.refresh()
        return self.token

    async def refresh(self, stale: Token | None = None) -> Token:
        """A new token (once for all callers that saw ``stale`` refused)."""
        async with self._lock:
            if stale is not None and self.token is not stale:
                return self.token
            token = await asyncio.to_thread(login, self.settings)
            if not same_org(token.org_id, self.token.org_id):
                raise AuthRefused(
                    f"the credentials now log in to org {token.org_id}, not {self.token.org_id}"
                )
            self.token = token
            self.refreshes += 1
            log.info("salesforce: access token refreshed")
            return token

    async def keep_fresh(self, stop: asyncio.Event, retry: float = 10.0) -> None:
        """Refresh each token before it ends; a network failure is retried (the old token still lives)."""
        while not stop.is_set():
            wait = max(self.token.refresh_at - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(stop.wait(), wait)
                return
            except TimeoutError:
                pass
            try:
                await self.refresh()
            except AuthUnavailable as exc:
                log.warning("salesforce: token refresh failed (%s); retrying in %.0fs", exc, retry)
                await asyncio.sleep(retry)
