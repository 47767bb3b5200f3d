"""The Faust app of a worker, configured from the settings."""

from __future__ import annotations

import faust

from streams.kafka import client as kafka_client
from streams.kafka.settings import Settings


def faust_app(settings: Settings) -> faust.App:
    """Faust as the worker uses it: group membership, tables and their recovery, timers and the
    web server; its own web views are off (they would expose deal data)."""
    heartbeat = min(3.0, settings.session_timeout / 3)
    return faust.App(
        settings.app_id,
        **kafka_client.faust_args(settings.broker),
        store=settings.store,
        datadir=str(settings.data_dir),
        autodiscover=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_disable_leader=True,
        table_standby_replicas=settings.standby_replicas,
        recovery_consistency_check=settings.recovery_consistency_check,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.session_timeout,
        broker_rebalance_timeout=settings.rebalance_timeout,
        broker_heartbeat_interval=heartbeat,
        broker_request_timeout=max(30.0, settings.session_timeout + 5),
        producer_linger_ms=5,
        web_port=settings.web_port,
        web_bind=settings.web_bind,
        web_stats_enabled=False,
        web_graph_enabled=False,
        web_tables_enabled=False,
        web_router_enabled=False,
        web_metrics_enabled=False,
        logging_config=None,
    )
