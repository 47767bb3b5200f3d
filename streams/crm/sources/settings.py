"""Settings of the CRM edge (``funnel-kpi ingest``) and the bridge (``funnel-kpi adapt``).

Kept apart from the worker's :class:`streams.kafka.settings.Settings` (same ``FUNNEL_`` prefix) so the
worker never sees webhook secrets. Secrets are ``SecretStr``: never printed, never logged, no
flag; from the environment or a ``FUNNEL_<NAME>_FILE`` (:mod:`streams.kafka.secrets`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from models.config import load_config
from streams.crm.sources.common import Context
from streams.crm.sources.debezium import DEFAULT_COLUMNS
from streams.kafka.secrets import SecretFileSettings

if TYPE_CHECKING:
    from streams.kafka.settings import Settings

SIGNATURE_VERSIONS = ("v1", "v2", "v3")


class SourceSettings(SecretFileSettings):
    """Every field is ``FUNNEL_<NAME>`` in the environment and ``--<name>`` on the command line,
    except secrets (``SecretStr``): environment or ``FUNNEL_<NAME>_FILE`` only."""

    model_config = SettingsConfigDict(env_prefix="FUNNEL_", extra="ignore")

    ingest_port: int = Field(8000, ge=1, le=65535, description="webhook receiver HTTP port")
    ingest_bind: str = Field("0.0.0.0", description="interface the webhook receiver binds")
    ingest_public_url: str | None = Field(
        None,
        description="public base URL the CRMs call, e.g. https://crm-hooks.example.com "
        "(HubSpot v2/v3 signatures cover it; default: taken from the request)",
    )
    ingest_max_body: int = Field(
        512 * 1024,
        ge=1024,
        description="largest accepted body, bytes (else 413); keep it under the "
        "broker's message.max.bytes (1 MB by default)",
    )
    ingest_write_timeout: float = Field(
        4.0,
        gt=0,
        description="seconds to wait for the broker to confirm a write (else 503; "
        "HubSpot gives up after 5 s)",
    )
    hubspot_client_secret: SecretStr | None = Field(
        None, description="HubSpot app client secret; unset: /webhooks/hubspot answers 404"
    )
    hubspot_signature_versions: str = Field(
        "v3",
        description="accepted HubSpot signature versions, comma-separated (v1,v2,v3); v1/v2 "
        "have no timestamp and can be replayed",
    )
    pipedrive_basic_auth: SecretStr | None = Field(
        None,
        description="user:password Pipedrive sends (http_auth_user/password); unset: "
        "/webhooks/pipedrive answers 404",
    )
    hubspot_topic: str = Field("crm.raw.hubspot", description="raw topic of HubSpot webhook bodies")
    pipedrive_topic: str = Field("crm.raw.pipedrive", description="raw topic of Pipedrive webhook bodies")
    salesforce_topic: str = Field("crm.raw.salesforce", description="topic of Salesforce CDC events")
    debezium_topics: str = Field("crm.raw.debezium", description="Debezium topics, comma-separated")
    lifecycle_pipeline: str = Field("lifecycle", description="pipeline of HubSpot contacts' lifecycle stage")
    salesforce_lead_pipeline: str = Field("lifecycle", description="pipeline of Salesforce leads' Status")
    debezium_columns: dict[str, str] = Field(
        default_factory=dict,
        description="JSON object overriding the Debezium column map "
        f"(default {json.dumps(DEFAULT_COLUMNS, separators=(',', ':'))})",
    )
    adapt_port: int = Field(6067, ge=1, le=65535, description="bridge HTTP port: /metrics, /healthz")
    adapt_batch: int = Field(500, ge=1, description="raw records adapted per batch (then committed)")

    @field_validator("hubspot_signature_versions")
    @classmethod
    def _versions(cls, value: str) -> str:
        versions = {part.strip().lower() for part in value.split(",") if part.strip()}
        if not versions or versions - set(SIGNATURE_VERSIONS):
            raise ValueError(f"use a comma-separated subset of {', '.join(SIGNATURE_VERSIONS)}")
        return ",".join(sorted(versions))

    @field_validator("pipedrive_basic_auth")
    @classmethod
    def _basic(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and ":" not in value.get_secret_value():
            raise ValueError("expected user:password")
        return value

    @field_validator("debezium_columns", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value)
        if isinstance(value, dict) and set(value) - set(DEFAULT_COLUMNS):
            raise ValueError(
                f"unknown keys {sorted(set(value) - set(DEFAULT_COLUMNS))}; "
                f"known: {', '.join(DEFAULT_COLUMNS)}"
            )
        return value

    @property
    def signature_versions(self) -> frozenset[str]:
        return frozenset(self.hubspot_signature_versions.split(","))

    @property
    def raw_topics(self) -> dict[str, str]:
        """Topic → source, for every topic the bridge reads."""
        topics = {
            self.hubspot_topic: "hubspot",
            self.pipedrive_topic: "pipedrive",
            self.salesforce_topic: "salesforce",
        }
        for name in self.debezium_topics.split(","):
            if name.strip():
                topics[name.strip()] = "debezium"
        return topics


# Secrets (FUNNEL_HUBSPOT_CLIENT_SECRET, FUNNEL_PIPEDRIVE_BASIC_AUTH) have no flag: a command
# line is visible to every user of the machine.
INGEST_SETTINGS = [
    "ingest_port",
    "ingest_bind",
    "ingest_public_url",
    "ingest_max_body",
    "ingest_write_timeout",
    "hubspot_signature_versions",
    "hubspot_topic",
    "pipedrive_topic",
]
ADAPT_SETTINGS = [
    "hubspot_topic",
    "pipedrive_topic",
    "salesforce_topic",
    "debezium_topics",
    "lifecycle_pipeline",
    "salesforce_lead_pipeline",
    "debezium_columns",
    "adapt_port",
    "adapt_batch",
]


def context(settings: Settings, sources: SourceSettings) -> Context:
    """What every adapter reads: the funnel config and these settings, checked (adapt, backfill)."""
    return Context(
        load_config(settings.config),
        lifecycle_pipeline=sources.lifecycle_pipeline,
        lead_pipeline=sources.salesforce_lead_pipeline,
        debezium_columns=sources.debezium_columns,
    ).check()
