"""The three Pub/Sub API calls the subscriber makes (service ``eventbus.v1.PubSub`` of
``pubsub_api.proto``), bound to the generated message classes: the client stub, and the server
side for a stand-in server. grpcio's code generator writes all six calls of the service (~420
lines, mostly the publishing ones this project never makes); these three are all it needs."""

from __future__ import annotations

from typing import Any

import grpc

from streams.crm.pubsub import pubsub_api_pb2 as pb2

SERVICE = "eventbus.v1.PubSub"
# name → (gRPC call kind, request message, response message), as the proto declares them
CALLS = {
    "Subscribe": ("stream_stream", pb2.FetchRequest, pb2.FetchResponse),
    "GetSchema": ("unary_unary", pb2.SchemaRequest, pb2.SchemaInfo),
    "GetTopic": ("unary_unary", pb2.TopicRequest, pb2.TopicInfo),
}


class PubSubStub:
    """``stub.Subscribe(...)``, ``stub.GetSchema(...)``, ``stub.GetTopic(...)`` on a channel."""

    Subscribe: Any
    GetSchema: Any
    GetTopic: Any

    def __init__(self, channel: grpc.aio.Channel) -> None:
        for name, (kind, request, response) in CALLS.items():
            setattr(self, name, getattr(channel, kind)(
                f"/{SERVICE}/{name}", request_serializer=request.SerializeToString,
                response_deserializer=response.FromString))


def service_handler(servicer: Any) -> grpc.GenericRpcHandler:
    """The service for a ``grpc.server``: each call goes to the servicer's method of that name."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: getattr(grpc, f"{kind}_rpc_method_handler")(
            getattr(servicer, name), request_deserializer=request.FromString,
            response_serializer=response.SerializeToString)
        for name, (kind, request, response) in CALLS.items()
    })
