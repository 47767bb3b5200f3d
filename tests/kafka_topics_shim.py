"""The part of Apache Kafka's ``kafka-topics.sh`` that docker-compose.yml's kafka-init runs
(``--create --if-not-exists --topic T --partitions N --replication-factor R --config k=v``
and ``--list``), answered against any broker, so the compose harness runs kafka-init's own
script against the embedded broker."""

from __future__ import annotations

import argparse
import asyncio
import sys

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError


def arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kafka-topics.sh")
    parser.add_argument("--bootstrap-server", required=True)
    parser.add_argument("--create", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--if-not-exists", action="store_true")
    parser.add_argument("--topic")
    parser.add_argument("--partitions", type=int)
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument("--config", action="append", default=[])
    args = parser.parse_args(argv)
    if args.create == args.list:
        parser.error("exactly one of --create, --list")
    if args.create and (not args.topic or not args.partitions):
        parser.error("--create needs --topic and --partitions")
    return args


async def run(args: argparse.Namespace) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=args.bootstrap_server)
    await admin.start()
    try:
        if args.list:
            print("\n".join(sorted(await admin.list_topics())))
            return
        configs = dict(item.split("=", 1) for item in args.config)
        topic = NewTopic(args.topic, args.partitions, args.replication_factor, topic_configs=configs)
        try:
            await admin.create_topics([topic])
        except TopicAlreadyExistsError:
            if not args.if_not_exists:
                raise
        print(f"Created topic {args.topic}.")
    finally:
        await admin.close()


if __name__ == "__main__":
    asyncio.run(run(arguments(sys.argv[1:])))
