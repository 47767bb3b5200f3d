"""The Prometheus series of ``funnel-kpi salesforce-cdc``, and when each channel was last heard.

One object the stream loop, the raw-topic writer and the HTTP server share, so that a series is
declared once and every part counts into the same registry (docs/operations.md, alert rules).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    """Every ``funnel_salesforce_cdc_*`` series, registered in the subscriber's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "funnel_salesforce_cdc_events",
            "Change events written to the raw topic",
            ["channel", "entity", "change_type"],
            registry=registry,
        )
        self.lag = Gauge(
            "funnel_salesforce_cdc_lag_seconds",
            "Now minus the commitTimestamp of the last change event written (0 once the "
            "stream says it is caught up)",
            ["channel"],
            registry=registry,
        )
        self.gaps = Counter(
            "funnel_salesforce_cdc_gaps",
            "Gap events: changes Salesforce could not describe",
            ["channel", "entity", "change_type"],
            registry=registry,
        )
        self.reconnects = Counter(
            "funnel_salesforce_cdc_reconnects",
            "Streams reopened, by reason",
            ["channel", "reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "funnel_salesforce_cdc_replay_fallbacks",
            "Stored replay ids Salesforce no longer retained (resubscribed from the preset)",
            ["channel"],
            registry=registry,
        )
        self.connected = Gauge(
            "funnel_salesforce_cdc_connected",
            "1 while the channel's stream is open",
            ["channel"],
            registry=registry,
        )
        self.last_message = Gauge(
            "funnel_salesforce_cdc_last_message_timestamp_seconds",
            "When the channel last got a response (events or keep-alive)",
            ["channel"],
            registry=registry,
        )
        self.undecodable = Counter(
            "funnel_salesforce_cdc_undecodable",
            "Events whose payload did not decode (skipped, logged with the replay id)",
            ["channel"],
            registry=registry,
        )
        self.token_refreshes = Gauge(
            "funnel_salesforce_cdc_token_refreshes",
            "Access tokens fetched since start after the first",
            registry=registry,
        )
        # monotonic time of each channel's last response, for /healthz
        self.last_seen: dict[str, float] = {}

    def declare(self, channels: list[str]) -> None:
        """Every channel's series from the start: disconnected, no lag yet, no fallback."""
        for name in channels:
            self.connected.labels(name).set(0)
            self.lag.labels(name)
            self.fallbacks.labels(name)

    def heard(self, name: str) -> None:
        """The channel got a response (events or keep-alive): its stream is open and alive."""
        self.connected.labels(name).set(1)
        self.last_message.labels(name).set(time.time())
        self.last_seen[name] = time.monotonic()
