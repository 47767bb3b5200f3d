"""The naive baseline: a plain Faust agent with one table update per event.

Runs as its own process (``python -m bench.naive_app``) so it gets a core like the real worker.
``GET /count`` answers how many events it has handled (cheap, so polling costs it little).
Settings: :data:`bench.baselines.NAIVE`; broker and port from ``BENCH_BROKER`` / ``BENCH_WEB_PORT``.
``BENCH_TABLE=0`` drops the table write: a reference for what Faust's per-event delivery alone
costs (not a baseline, nothing is judged against it).
"""

from __future__ import annotations

import os

import faust

from bench.baselines import NAIVE, PARTITIONS
from streams.kafka.client import faust_args


def create_app(broker: str, web_port: int, data_dir: str, *, app_id: str = NAIVE["app_id"],
               table: bool = True) -> faust.App:
    app = faust.App(
        app_id,
        **faust_args(broker),
        store=NAIVE["store"],
        datadir=data_dir,
        autodiscover=False,
        topic_partitions=PARTITIONS,
        topic_disable_leader=True,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=NAIVE["session_timeout_s"],
        broker_rebalance_timeout=NAIVE["rebalance_timeout_s"],
        broker_heartbeat_interval=NAIVE["heartbeat_s"],
        web_port=web_port,
        web_bind="127.0.0.1",
        logging_config=None,
    )
    events = app.topic("crm.events", value_serializer="json")
    deals = app.Table("deals", default=dict, partitions=NAIVE["table_partitions"])
    handled = {"count": 0}

    @app.agent(events)
    async def naive(stream: faust.StreamT) -> None:
        async for event in stream:
            if table:
                deals[event["deal_id"]] = event
            handled["count"] += 1

    @app.page("/count")
    async def count(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json(handled)

    return app


def main() -> None:
    app = create_app(os.environ["BENCH_BROKER"], int(os.environ["BENCH_WEB_PORT"]),
                     os.environ["BENCH_DATA_DIR"], app_id=os.environ.get("BENCH_APP_ID", NAIVE["app_id"]),
                     table=os.environ.get("BENCH_TABLE", "1") != "0")
    faust.Worker(app, loglevel="WARNING", quiet=True, override_logging=False).execute_from_commandline()


if __name__ == "__main__":
    main()
