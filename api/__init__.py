"""The PersonSearch API, version 1: the proto, its generated stubs and a client.

Depends on grpcio and protobuf only, so camera-system backends, the console and the load
test can use it without the ML core or the service:

    from icl_api import PersonSearchClient
    with PersonSearchClient("127.0.0.1:50051") as client:
        hits = client.search(text="a woman in a red coat").hits

The wire contract is `proto/icl/reid/v1/person_search.proto` (package `icl.reid.v1`); the
stubs in `v1/` are generated from it by `python -m icl_api.generate`.
"""

from icl_api.client import (
    MAX_MESSAGE_BYTES,
    AsyncPersonSearchClient,
    PersonSearchClient,
    TlsOptions,
    channel_options,
    delete_request,
    gallery_image,
    list_images_request,
    search_request,
    timestamp,
)
from icl_api.v1 import person_search_pb2 as pb
from icl_api.v1 import person_search_pb2_grpc as pb_grpc

__all__ = [
    "MAX_MESSAGE_BYTES",
    "AsyncPersonSearchClient",
    "PersonSearchClient",
    "TlsOptions",
    "channel_options",
    "delete_request",
    "gallery_image",
    "list_images_request",
    "pb",
    "pb_grpc",
    "search_request",
    "timestamp",
]
