"""The embedded broker a test or the demo starts on a port it picked."""

import socket

import pytest

from streams.tools.broker import EmbeddedBroker

pytestmark = pytest.mark.broker


def test_a_picked_port_taken_before_the_broker_binds_it_is_picked_again():
    # What six test processes picking ports at once can do: another socket holds the picked port
    # when Tansu binds it; Tansu exits, and start() picks another instead of waiting 20 s.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    broker = EmbeddedBroker()
    taken = broker.port = broker.listen_port = holder.getsockname()[1]
    try:
        broker.start()
        assert broker.port != taken and broker.process.poll() is None
        with socket.create_connection(("127.0.0.1", broker.port), timeout=5):
            pass
    finally:
        broker.stop()
        holder.close()


def test_a_port_the_caller_chose_is_not_changed():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    taken = holder.getsockname()[1]
    try:
        with pytest.raises(TimeoutError, match="the process exited"):
            EmbeddedBroker(taken).start()
    finally:
        holder.close()
