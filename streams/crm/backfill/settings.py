"""Settings of ``funnel-kpi backfill``: API endpoints, credentials (or files holding them), pacing.

Credentials have no command-line flag (a command line is visible to every user of the machine):
``FUNNEL_<NAME>`` holds the secret, or ``FUNNEL_<NAME>_FILE`` names a file that does (Docker and
Kubernetes secrets).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

_RATE = re.compile(r"(\d+)/(\d+(?:\.\d+)?)")
SECRETS = ("hubspot_access_token", "pipedrive_api_token", "salesforce_access_token")


class BackfillSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FUNNEL_", extra="ignore")

    hubspot_api_url: str = Field("https://api.hubapi.com", description="HubSpot API base URL")
    hubspot_access_token: SecretStr | None = Field(None, description="HubSpot private app access token")
    hubspot_access_token_file: Path | None = Field(None, description="file holding the HubSpot token")
    pipedrive_api_url: str = Field(
        "https://api.pipedrive.com", description="Pipedrive API base URL (https://<company>.pipedrive.com)"
    )
    pipedrive_api_token: SecretStr | None = Field(None, description="Pipedrive API token")
    pipedrive_api_token_file: Path | None = Field(None, description="file holding the Pipedrive token")
    salesforce_instance_url: str | None = Field(None, description="Salesforce instance URL (https://…)")
    salesforce_access_token: SecretStr | None = Field(None, description="Salesforce OAuth access token")
    salesforce_access_token_file: Path | None = Field(None, description="file holding the Salesforce token")
    salesforce_api_version: str = Field("59.0", description="Salesforce REST API version")
    salesforce_ca_bundle: Path | None = Field(
        None, description="CA bundle for the Salesforce host (default: the system's)"
    )
    backfill_rate: str | None = Field(
        None,
        description="most API requests per window, N/SECONDS (default per CRM: HubSpot 100/10, "
        "Pipedrive 40/2, Salesforce 25/1)",
    )
    backfill_timeout: float = Field(30.0, gt=0, description="seconds before an API request is retried")
    backfill_retries: int = Field(
        8, ge=0, description="retries of a request (429, 5xx, timeout) before giving up"
    )
    backfill_state_dir: Path = Field(Path("data"), description="directory of backfill checkpoints")
    salesforce_api_budget: float = Field(
        0.9, gt=0, le=1, description="stop (resumable) once this share of the org's daily API calls is used"
    )

    @field_validator("backfill_rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None and not _RATE.fullmatch(value):
            raise ValueError("expected N/SECONDS, e.g. 100/10")
        return value

    def secret(self, name: str) -> str:
        """The credential ``name`` from its variable or its ``_FILE``; a clear error if neither."""
        value: SecretStr | None = getattr(self, name)
        path: Path | None = getattr(self, f"{name}_file")
        if value is not None and path is not None:
            raise ValueError(f"both FUNNEL_{name.upper()} and FUNNEL_{name.upper()}_FILE are set: "
                             "unset one of them")
        if value is not None:
            return value.get_secret_value()
        if path is not None:
            try:
                return path.read_text().strip()
            except OSError as exc:
                raise ValueError(f"FUNNEL_{name.upper()}_FILE: cannot read {path}: {exc.strerror}; mount "
                                 f"the secret there or unset FUNNEL_{name.upper()}_FILE") from None
        raise ValueError(f"set FUNNEL_{name.upper()} or FUNNEL_{name.upper()}_FILE")

    def rate(self, default: str) -> tuple[int, float]:
        match = _RATE.fullmatch(self.backfill_rate or default)
        assert match is not None
        return int(match[1]), float(match[2])


FLAGS = [
    "hubspot_api_url",
    "pipedrive_api_url",
    "salesforce_instance_url",
    "salesforce_api_version",
    "backfill_rate",
    "backfill_timeout",
    "backfill_retries",
    "backfill_state_dir",
    "salesforce_api_budget",
]
