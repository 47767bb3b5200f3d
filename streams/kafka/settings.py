"""Runtime settings from ``FUNNEL_*`` environment variables (and CLI flags that override them).

Secrets (``SecretStr`` fields) have no flag: they come from the environment or from a file named
by ``FUNNEL_<NAME>_FILE`` (:mod:`streams.kafka.secrets`), and are never printed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import SettingsConfigDict

from models.config import Clock
from streams.kafka.secrets import SecretFileSettings


class Settings(SecretFileSettings):
    """Every field is ``FUNNEL_<NAME>`` in the environment and ``--<name>`` on the command line,
    except secrets (``SecretStr``): environment or ``FUNNEL_<NAME>_FILE`` only."""

    model_config = SettingsConfigDict(env_prefix="FUNNEL_", extra="ignore")

    broker: str = Field("kafka://127.0.0.1:9092", description="Kafka bootstrap URL(s), kafka://host:port[;host:port]")
    web_port: int = Field(6066, ge=1, le=65535, description="worker HTTP port: /metrics")
    web_bind: str = Field("0.0.0.0", description="interface the worker HTTP server binds")
    data_dir: Path = Field(Path("data"), description="worker state directory (RocksDB tables)")
    config: Path | None = Field(None, description="funnel config YAML (default: the shipped funnel.yaml)")
    clock: Clock | None = Field(None, description="wall | stream (default: the config's clock, wall)")
    redis_url: SecretStr | None = Field(
        None, description="Redis URL for the optional KPI sink (secret: may hold a password)",
    )
    api_token: SecretStr | None = Field(
        None, description="bearer token required by the /kpis API (unset: open)",
    )
    store: str = Field("memory://", description="table store: memory:// or rocksdb://")
    rocksdb_block_cache_mb: int = Field(16, ge=1, description="RocksDB block cache per table partition, MiB")
    rocksdb_write_buffer_mb: int = Field(
        8, ge=1, description="RocksDB write buffer per table partition, MiB (2 kept)",
    )
    recovery_consistency_check: bool = Field(
        True, description="refuse RocksDB state ahead of its changelog (off on Tansu: see README)",
    )
    app_id: str = Field("funnel-kpi", description="consumer group and changelog topic prefix")
    partitions: int = Field(8, ge=1, description="partitions of crm.events and internal topics")
    replication_factor: int = Field(1, ge=1, description="replication factor of created topics")
    standby_replicas: int = Field(1, ge=0, description="table standby replicas on other workers")
    max_future_skew: float = Field(86400.0, gt=0, description="seconds an occurred_at may lie in the future")
    min_occurred_at: datetime = Field(
        datetime(2000, 1, 1, tzinfo=UTC),
        description="earliest occurred_at accepted (older: rejected as ancient_timestamp)",
    )
    batch_size: int = Field(10000, ge=1, description="records handled per batch of the batch loop")
    tick_interval: float = Field(
        10.0, gt=0, description="seconds between stall checks (a step of the batch loop) and partials",
    )
    stall_alerts_per_tick: int = Field(
        200, ge=1, description="most deal.stalled alerts one partition raises per tick (more wait a tick)",
    )
    fetch_max_wait_ms: int = Field(
        100, ge=1, le=1500, description="longest a fetch waits for data, ms (latency)",
    )
    session_timeout: float = Field(10.0, gt=0, description="consumer group session timeout, seconds")
    rebalance_timeout: float = Field(10.0, gt=0, description="consumer group rebalance timeout, seconds")
    log_level: str = Field("info", description="debug | info | warning | error")

    @field_validator("store")
    @classmethod
    def _store(cls, value: str) -> str:
        """Checked here: Faust would only fail inside the worker, with a long traceback."""
        if value.partition("://")[::2] not in (("memory", ""), ("rocksdb", "")) or "://" not in value:
            raise ValueError("use memory:// or rocksdb:// (RocksDB state lives in FUNNEL_DATA_DIR)")
        return value
