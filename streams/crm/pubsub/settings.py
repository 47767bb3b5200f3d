"""Settings of ``funnel-kpi salesforce-cdc`` (``FUNNEL_SALESFORCE_*``).

Secrets (the JWT signing key, the client secret) are ``SecretStr``: no flag, from the
environment or a ``FUNNEL_<NAME>_FILE`` (:mod:`streams.kafka.secrets`), never printed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from streams.kafka.secrets import SecretFileSettings

DEFAULT_CHANNELS = "/data/OpportunityChangeEvent,/data/LeadChangeEvent"


class CdcSettings(SecretFileSettings):
    """Every field is ``FUNNEL_<NAME>`` in the environment and ``--<name>`` on the command line,
    except secrets (``SecretStr``): environment or ``FUNNEL_<NAME>_FILE`` only."""

    # Empty means unset: docker compose passes ${VAR:-} through as "".
    model_config = SettingsConfigDict(env_prefix="FUNNEL_", extra="ignore", env_ignore_empty=True)

    salesforce_auth: Literal["jwt", "client_credentials"] = Field(
        "jwt", description="OAuth flow: jwt (JWT bearer, a certificate) or client_credentials"
    )
    salesforce_login_url: str = Field(
        "https://login.salesforce.com",
        description="OAuth token endpoint host: https://login.salesforce.com, https://test.salesforce.com "
        "(sandbox), or https://<domain>.my.salesforce.com (client_credentials needs My Domain)",
    )
    salesforce_client_id: str | None = Field(None, description="the connected app's consumer key")
    salesforce_username: str | None = Field(None, description="jwt: the integration user's username")
    salesforce_jwt_audience: str | None = Field(
        None, description="jwt: the aud claim (default: FUNNEL_SALESFORCE_LOGIN_URL)"
    )
    salesforce_private_key: SecretStr | None = Field(
        None, description="jwt: the PEM private key of the connected app's certificate (secret)"
    )
    salesforce_client_secret: SecretStr | None = Field(
        None, description="client_credentials: the connected app's consumer secret (secret)"
    )
    salesforce_org_id: str | None = Field(
        None, description="the org (tenant) id expected; a token of another org is refused"
    )
    salesforce_token_ttl: float = Field(
        7200.0,
        gt=0,
        description="seconds an access token lives (the org's session timeout); refreshed before it ends",
    )
    salesforce_pubsub_url: str = Field(
        "api.pubsub.salesforce.com:7443", description="Pub/Sub API host:port (gRPC over TLS)"
    )
    salesforce_ca_bundle: Path | None = Field(
        None, description="CA bundle for the Salesforce hosts (default: the system's / gRPC's)"
    )
    salesforce_channels: str = Field(
        DEFAULT_CHANNELS,
        description="channels, comma-separated: /data/<Object>ChangeEvent or a "
        "custom channel /data/<Name>__chn",
    )
    salesforce_replay_preset: Literal["EARLIEST", "LATEST"] = Field(
        "EARLIEST",
        description="where a channel starts without a stored replay id, or when the "
        "stored one has expired: EARLIEST (the retained 3 days) or LATEST",
    )
    salesforce_fetch: int = Field(
        100, ge=1, le=1000, description="events requested per FetchRequest (flow control: num_requested)"
    )
    salesforce_keepalive_timeout: float = Field(
        300.0,
        gt=0,
        description="seconds without any message (Salesforce sends a keep-alive within "
        "270 s) before the stream is taken as dead and reopened",
    )
    salesforce_reconnect_max: float = Field(
        60.0, gt=0, description="longest wait between reconnects, seconds (exponential backoff)"
    )
    salesforce_topic: str = Field("crm.raw.salesforce", description="raw topic the change events go to")
    salesforce_replay_topic: str = Field(
        "funnel.salesforce.replay", description="compacted topic of the last stored replay id per channel"
    )
    salesforce_cdc_port: int = Field(6068, ge=1, le=65535, description="HTTP port: /metrics, /healthz")

    @field_validator("salesforce_channels")
    @classmethod
    def _channels(cls, value: str) -> str:
        names = [part.strip() for part in value.split(",") if part.strip()]
        bad = [name for name in names if not name.startswith(("/data/", "/event/"))]
        if not names or bad:
            raise ValueError("expected comma-separated channels like /data/OpportunityChangeEvent")
        return ",".join(names)

    @model_validator(mode="after")
    def _credentials(self) -> CdcSettings:
        if not self.salesforce_client_id:
            raise ValueError("set FUNNEL_SALESFORCE_CLIENT_ID (the connected app's consumer key)")
        if self.salesforce_auth == "jwt" and not (self.salesforce_username and self.salesforce_private_key):
            raise ValueError(
                "the jwt flow needs FUNNEL_SALESFORCE_USERNAME and FUNNEL_SALESFORCE_PRIVATE_KEY(_FILE)"
            )
        if self.salesforce_auth == "client_credentials" and not self.salesforce_client_secret:
            raise ValueError("the client_credentials flow needs FUNNEL_SALESFORCE_CLIENT_SECRET(_FILE)")
        return self

    @property
    def channels(self) -> list[str]:
        return self.salesforce_channels.split(",")


FLAGS = [
    name
    for name, info in CdcSettings.model_fields.items()
    if info.annotation is not SecretStr and SecretStr not in getattr(info.annotation, "__args__", ())
]
