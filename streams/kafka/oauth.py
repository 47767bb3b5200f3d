"""Tokens for SASL/OAUTHBEARER: an OAuth 2.0 client-credentials grant (Confluent Cloud with
OAuth, Azure Event Hubs, any OIDC provider) or an Amazon MSK IAM token (MSK with IAM access
control, MSK Serverless). aiokafka asks :meth:`token` at every connection's login; a token is
reused until shortly before it expires, so a fleet of connections costs one token request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
from aiokafka.abc import AbstractTokenProvider

from streams.kafka.startup import StartupError

if TYPE_CHECKING:
    from streams.kafka.client import KafkaSecurity

# A token is renewed this long before it expires (or at 80 % of a shorter lifetime).
RENEW_BEFORE_S = 60.0
# A token endpoint that states no lifetime: assume this one.
DEFAULT_LIFETIME_S = 300.0


class TokenRefused(StartupError):
    """No token could be had: the message says which setting to check."""


class _CachedTokens(AbstractTokenProvider):
    """Reuses the last token until it is about to expire (the clients of a process share one
    provider: :func:`token_provider`)."""

    def __init__(self) -> None:
        self._token: str | None = None
        self._renew_at = 0.0

    async def token(self) -> str:
        if self._token is None or time.monotonic() >= self._renew_at:
            token, lifetime = await self._fetch()
            self._token = token
            self._renew_at = time.monotonic() + min(lifetime - RENEW_BEFORE_S, lifetime * 0.8)
        return self._token

    async def _fetch(self) -> tuple[str, float]:
        """A new token and its lifetime in seconds."""
        raise NotImplementedError


class ClientCredentialsTokens(_CachedTokens):
    """RFC 6749 §4.4: POST ``grant_type=client_credentials`` (client id and secret in the body,
    as Azure AD, Okta and Keycloak accept) to the token endpoint; SASL extensions (Confluent
    Cloud's ``logicalCluster`` and ``identityPoolId``) go with every login."""

    def __init__(self, url: str, client_id: str, client_secret: str, scope: str | None,
                 extensions: dict[str, str]) -> None:
        super().__init__()
        self.url, self.client_id, self.client_secret, self.scope = url, client_id, client_secret, scope
        self._extensions = extensions

    def extensions(self) -> dict[str, str]:
        return self._extensions

    async def _fetch(self) -> tuple[str, float]:
        form = {"grant_type": "client_credentials", "client_id": self.client_id,
                "client_secret": self.client_secret}
        if self.scope:
            form["scope"] = self.scope
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
                    session.post(self.url, data=form, headers={"Accept": "application/json"}) as response:
                body = await response.json(content_type=None) if response.status < 500 else None
                status = response.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise TokenRefused(f"cannot get an OAuth token from FUNNEL_KAFKA_OAUTH_TOKEN_URL={self.url} "
                               f"({type(exc).__name__}: {exc}); check the URL and the network") from None
        if status != 200 or not isinstance(body, dict) or not body.get("access_token"):
            error = body.get("error_description") or body.get("error") if isinstance(body, dict) else None
            raise TokenRefused(
                f"the OAuth token endpoint {self.url} refused the client-credentials grant (HTTP {status}"
                f"{': ' + str(error) if error else ''}); check FUNNEL_KAFKA_OAUTH_CLIENT_ID, "
                "FUNNEL_KAFKA_OAUTH_CLIENT_SECRET(_FILE) and FUNNEL_KAFKA_OAUTH_SCOPE")
        return body["access_token"], float(body.get("expires_in") or DEFAULT_LIFETIME_S)


class MskIamTokens(_CachedTokens):
    """Amazon MSK IAM: a SigV4-signed ``kafka-cluster:Connect`` request made by AWS's signer
    library with the default AWS credentials chain (environment, web identity / IRSA, ECS or
    EC2 instance role, shared profile)."""

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region
        # "Found credentials in …" at INFO on every signing: not news, and standard error of a
        # command that refuses to start holds one line.
        logging.getLogger("botocore.credentials").setLevel(logging.WARNING)

    async def _fetch(self) -> tuple[str, float]:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

        try:
            token, expires_ms = await asyncio.to_thread(MSKAuthTokenProvider.generate_auth_token,
                                                        self.region)
        except Exception as exc:  # botocore's credential errors have no common base
            raise TokenRefused(
                f"cannot sign an MSK IAM token for region {self.region} ({type(exc).__name__}: {exc}); "
                "give the process AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a web "
                "identity or an instance role) and check FUNNEL_KAFKA_AWS_REGION") from None
        return token, max(expires_ms / 1000 - time.time(), 1.0)


# One provider per distinct setting in a process: every client of the process shares its token.
_providers: dict[tuple, _CachedTokens] = {}


def token_provider(security: KafkaSecurity) -> _CachedTokens:
    """The provider the settings name (checked by :class:`~streams.kafka.client.KafkaSecurity`),
    shared by every client of the process that has the same settings."""
    if security.oauth_provider == "aws-msk-iam":
        key: tuple = ("aws-msk-iam", security.aws_region)
    else:
        key = ("client-credentials", security.oauth_token_url, security.oauth_client_id,
               security.client_secret(), security.oauth_scope, security.oauth_extensions)
    provider = _providers.get(key)
    if provider is None:
        provider = _providers[key] = (
            MskIamTokens(security.aws_region) if key[0] == "aws-msk-iam"  # type: ignore[arg-type]
            else ClientCredentialsTokens(*key[1:5], dict(  # type: ignore[arg-type]
                pair.split("=", 1) for pair in (security.oauth_extensions or "").split(",") if pair)))
    return provider
