"""How every Kafka client in the project connects: bootstrap servers, TLS and SASL.

One place builds the connection arguments, so the Faust app, the events consumer, the
producers, the receiver, the adapter, the API's reader, ``erase``, the topic admin and the
bench clients all reach a secured cluster (Confluent Cloud, MSK, Aiven, Strimzi, Azure Event
Hubs) the same way: TLS, SASL PLAIN/SCRAM, or SASL OAUTHBEARER with an OAuth client-credentials
or Amazon MSK IAM token (:mod:`streams.kafka.oauth`).
``tests/test_kafka_client.py`` fails if a client is built without :func:`client_args` or
:func:`faust_args`. Settings come from the environment only (``FUNNEL_KAFKA_*``): secrets on a
command line show in ``ps``. The start-up check that a broker answers, and its one-line failures,
is :mod:`streams.kafka.broker_check`.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.kafka.oauth import token_provider
from streams.kafka.startup import StartupError, env_name

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT

Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
OAuthProvider = Literal["client-credentials", "aws-msk-iam"]


class BrokerUnavailable(StartupError):
    """The broker cannot be reached or refuses this client; the message says which setting to check."""


class KafkaSecurity(BaseSettings):
    """``FUNNEL_KAFKA_<NAME>`` environment variables (never flags: they hold secrets)."""

    # Empty means unset: docker compose passes ${VAR:-} through as "".
    model_config = SettingsConfigDict(env_prefix="FUNNEL_KAFKA_", extra="ignore", env_ignore_empty=True)

    security_protocol: Protocol = Field(
        "PLAINTEXT", description="PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL",
    )
    sasl_mechanism: Mechanism = Field(
        "PLAIN", description="PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | OAUTHBEARER")
    sasl_username: str | None = Field(None, description="SASL user name (API key on Confluent Cloud)")
    sasl_password: SecretStr | None = Field(None, description="SASL password")
    sasl_password_file: Path | None = Field(
        None, description="file holding the SASL password (a mounted secret)",
    )
    oauth_provider: OAuthProvider = Field(
        "client-credentials", description="OAUTHBEARER tokens: client-credentials | aws-msk-iam")
    oauth_token_url: str | None = Field(None, description="OAuth token endpoint (client-credentials)")
    oauth_client_id: str | None = Field(None, description="OAuth client id (client-credentials)")
    oauth_client_secret: SecretStr | None = Field(None, description="OAuth client secret")
    oauth_client_secret_file: Path | None = Field(None, description="file holding the OAuth client secret")
    oauth_scope: str | None = Field(None, description="OAuth scope (Azure Event Hubs: https://<namespace>"
                                    ".servicebus.windows.net/.default)")
    oauth_extensions: str | None = Field(
        None, description="SASL extensions key=value,key=value (Confluent Cloud: logicalCluster=lkc-…,"
                          "identityPoolId=pool-…)")
    aws_region: str | None = Field(None, description="AWS region of the MSK cluster (aws-msk-iam)")
    ssl_cafile: Path | None = Field(
        None, description="CA bundle (PEM) to verify the brokers (unset: system CAs)",
    )
    ssl_certfile: Path | None = Field(None, description="client certificate (PEM) for mutual TLS")
    ssl_keyfile: Path | None = Field(None, description="client private key (PEM) for mutual TLS")
    ssl_check_hostname: bool = Field(True, description="verify the broker certificate names the host")
    connect_timeout: float = Field(30.0, gt=0, description="seconds to reach the broker at start-up")

    @model_validator(mode="after")
    def _consistent(self) -> KafkaSecurity:
        if self.sasl_password is not None and self.sasl_password_file is not None:
            # like every other secret (streams/kafka/secrets.py): neither silently wins
            raise ValueError("both FUNNEL_KAFKA_SASL_PASSWORD and FUNNEL_KAFKA_SASL_PASSWORD_FILE are "
                             "set: unset one of them")
        if self.oauth:
            self._check_oauth()
        elif self.sasl and not self.sasl_username:
            raise ValueError(f"{self.security_protocol} needs FUNNEL_KAFKA_SASL_USERNAME")
        elif self.sasl and self.sasl_password is None and self.sasl_password_file is None:
            raise ValueError(
                f"{self.security_protocol} needs FUNNEL_KAFKA_SASL_PASSWORD or "
                "FUNNEL_KAFKA_SASL_PASSWORD_FILE"
            )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("FUNNEL_KAFKA_SSL_CERTFILE and FUNNEL_KAFKA_SSL_KEYFILE go together")
        return self

    def _check_oauth(self) -> None:
        if self.oauth_client_secret is not None and self.oauth_client_secret_file is not None:
            raise ValueError("both FUNNEL_KAFKA_OAUTH_CLIENT_SECRET and "
                             "FUNNEL_KAFKA_OAUTH_CLIENT_SECRET_FILE are set: unset one of them")
        if self.oauth_provider == "aws-msk-iam":
            if not self.aws_region:
                raise ValueError("FUNNEL_KAFKA_OAUTH_PROVIDER=aws-msk-iam needs FUNNEL_KAFKA_AWS_REGION")
            return
        missing = [name for name, value in (
            ("FUNNEL_KAFKA_OAUTH_TOKEN_URL", self.oauth_token_url),
            ("FUNNEL_KAFKA_OAUTH_CLIENT_ID", self.oauth_client_id),
            ("FUNNEL_KAFKA_OAUTH_CLIENT_SECRET(_FILE)",
             self.oauth_client_secret or self.oauth_client_secret_file),
        ) if not value]
        if missing:
            raise ValueError(f"SASL OAUTHBEARER with client-credentials needs {', '.join(missing)}")
        for pair in (self.oauth_extensions or "").split(","):
            if pair and "=" not in pair:
                raise ValueError(f"FUNNEL_KAFKA_OAUTH_EXTENSIONS: {pair!r} is not key=value")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @property
    def oauth(self) -> bool:
        return self.sasl and self.sasl_mechanism == "OAUTHBEARER"

    def tokens(self) -> Any:
        """The process's OAUTHBEARER token provider for these settings."""
        return token_provider(self)

    def client_secret(self) -> str:
        if self.oauth_client_secret is not None:
            return self.oauth_client_secret.get_secret_value()
        return _read_secret("FUNNEL_KAFKA_OAUTH_CLIENT_SECRET_FILE", self.oauth_client_secret_file)

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def password(self) -> str:
        if self.sasl_password is not None:
            return self.sasl_password.get_secret_value()
        return _read_secret("FUNNEL_KAFKA_SASL_PASSWORD_FILE", self.sasl_password_file)

    def ssl_context(self) -> ssl.SSLContext:
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise BrokerUnavailable(f"FUNNEL_KAFKA_{name.upper()} {path}: no such file")
        try:
            # What aiokafka.helpers.create_ssl_context does, without its INFO line per client.
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ssl_cafile)
            if self.ssl_certfile is not None:
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
        except ssl.SSLError as exc:
            raise BrokerUnavailable(
                f"cannot load the TLS files (FUNNEL_KAFKA_SSL_CAFILE/CERTFILE/KEYFILE): {exc.reason or exc}"
            ) from None
        context.check_hostname = self.ssl_check_hostname
        return context

    def aiokafka_args(self) -> dict[str, Any]:
        """Keyword arguments every aiokafka client (and ``create_conn``) takes."""
        args: dict[str, Any] = {"security_protocol": self.security_protocol}
        if self.tls:
            args["ssl_context"] = self.ssl_context()
        if self.oauth:
            args.update(sasl_mechanism="OAUTHBEARER", sasl_oauth_token_provider=self.tokens())
        elif self.sasl:
            args.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=self.password())
        return args

    def faust_credentials(self) -> CredentialsT | None:
        """Faust's aiokafka driver turns these back into the same aiokafka arguments
        (``credentials_to_aiokafka_auth``; SCRAM passes through as ``sasl_mechanism``)."""
        # only the worker needs Faust
        from faust.auth import OAuthCredentials, SASLCredentials, SSLCredentials

        if self.oauth:
            return OAuthCredentials(oauth_cb=self.tokens(),
                                    ssl_context=self.ssl_context() if self.tls else None)
        if self.sasl:
            return SASLCredentials(
                username=self.sasl_username, password=self.password(), mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context() if self.tls else None,
            )
        if self.tls:
            return SSLCredentials(self.ssl_context())
        return None


def _read_secret(variable: str, path: Path | None) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")  # type: ignore[union-attr]
    except OSError as exc:
        raise BrokerUnavailable(
            f"{variable}={path}: cannot read the secret file ({exc.strerror or exc}); mount the "
            f"secret there or unset {variable}"
        ) from None


def load_security() -> KafkaSecurity:
    """The security settings from the environment; a bad value is one line naming the setting."""
    try:
        return KafkaSecurity()
    except ValidationError as exc:
        error = exc.errors()[0]
        where = env_name(KafkaSecurity, str(error["loc"][0])) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")  # a check across settings names them
        raise BrokerUnavailable(f"{where}: {message}" if where else message) from None


def bootstrap_servers(broker_url: str) -> list[str]:
    """``kafka://a:9092;b:9092`` → ``['a:9092', 'b:9092']``."""
    hosts = []
    for part in broker_url.replace(",", ";").split(";"):
        part = part.strip()
        if part:
            hosts.append(part.split("://", 1)[-1])
    return hosts


def client_args(broker_url: str, security: KafkaSecurity | None = None) -> dict[str, Any]:
    """``bootstrap_servers`` plus TLS/SASL arguments for ``AIOKafkaProducer``/``Consumer``/``AdminClient``."""
    security = security or load_security()
    return {"bootstrap_servers": bootstrap_servers(broker_url), **security.aiokafka_args()}


def faust_args(broker_url: str, security: KafkaSecurity | None = None) -> dict[str, Any]:
    """``broker`` and ``broker_credentials`` for ``faust.App``."""
    security = security or load_security()
    return {"broker": broker_url, "broker_credentials": security.faust_credentials()}
