"""The Faust app of a worker, configured from the settings."""

from __future__ import annotations

import faust
from mode.utils.queues import FlowControlEvent

from streams.kafka import client as kafka_client
from streams.kafka.settings import Settings


class KeepQueuedOnResume(FlowControlEvent):
    """Flow control that clears its queues only when resuming from a suspension.

    Faust reads every changelog record (table recovery and standby copies) through one queue
    that its flow control clears on ``resume()``. A rebalance suspends the flow, and what was
    queued before it is stale (recovery seeks again), so clearing then is right. But Faust
    also resumes a flow that is already running: once standby partitions have started
    reading, and again when recovery ends. Clearing then drops records the consumer has
    already moved past. The standby copy gets a hole below its persisted offset, and when
    that worker takes the partition over, recovery starts after the hole: a customers row or
    a deal is missing from its exports for good."""

    def resume(self) -> None:
        if self.is_active():
            return  # already flowing: what is queued is live, not stale
        super().resume()


def faust_app(settings: Settings) -> faust.App:
    """Faust as the worker uses it: group membership, tables and their recovery, timers and the
    web server; its own web views are off (they would expose deal data)."""
    heartbeat = min(3.0, settings.session_timeout / 3)
    app = faust.App(
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
    # Before anything creates a queue: the queues register with the app's flow control.
    app.flow_control = KeepQueuedOnResume(loop=app.loop)
    return app
