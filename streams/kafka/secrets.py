"""Secret settings from mounted files: ``FUNNEL_<NAME>_FILE`` names a file holding the value of
the secret setting ``FUNNEL_<NAME>`` (Docker/Kubernetes secrets), so it appears neither in the
environment of other processes nor on a command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from streams.kafka.startup import StartupError, env_name, is_secret


class SecretFilesSource(PydanticBaseSettingsSource):
    """Reads every secret field's ``*_FILE`` variable; an unreadable or empty file stops start-up."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ reads all fields at once

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for field in self.settings_cls.model_fields:
            if not is_secret(self.settings_cls, field):
                continue
            name = env_name(self.settings_cls, field)
            path = os.environ.get(f"{name}_FILE")
            if not path:
                continue
            if os.environ.get(name):
                raise StartupError(f"both {name} and {name}_FILE are set: unset one of them")
            try:
                values[field] = Path(path).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise StartupError(
                    f"{name}_FILE={path}: cannot read the secret file ({exc.strerror or exc}); "
                    f"mount the secret there or unset {name}_FILE"
                ) from None
            if not values[field].strip():
                # A mounted but empty secret would read as "not set": an open API, no signature
                # check. Whoever names a file means a secret.
                raise StartupError(f"{name}_FILE={path}: the secret file is empty; put the secret in "
                                   f"it or unset {name}_FILE")
        return values


class SecretFileSettings(BaseSettings):
    """Base of the ``FUNNEL_*`` settings: arguments, then the environment, then secret files."""

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, SecretFilesSource(settings_cls), dotenv_settings,
                file_secret_settings)
