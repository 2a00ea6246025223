"""Server reflection on the running service: v1 (asked first by grpcurl and newer tools) and
v1alpha.

The v1 client messages are built here from upstream's grpc/reflection/v1/reflection.proto
layout (written out below), independently of the server's own code.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from icl_api import pb

F = descriptor_pb2.FieldDescriptorProto
STRING, INT32, BYTES, MESSAGE = F.TYPE_STRING, F.TYPE_INT32, F.TYPE_BYTES, F.TYPE_MESSAGE
V1 = "grpc.reflection.v1"
# message -> (field, number, type, message type, repeated, in the oneof), as upstream declares.
V1_LAYOUT: dict[str, list[tuple[str, int, int, str, bool, bool]]] = {
    "ServerReflectionRequest": [
        ("host", 1, STRING, "", False, False),
        ("file_by_filename", 3, STRING, "", False, True),
        ("file_containing_symbol", 4, STRING, "", False, True),
        ("file_containing_extension", 5, MESSAGE, "ExtensionRequest", False, True),
        ("all_extension_numbers_of_type", 6, STRING, "", False, True),
        ("list_services", 7, STRING, "", False, True),
    ],
    "ExtensionRequest": [
        ("containing_type", 1, STRING, "", False, False),
        ("extension_number", 2, INT32, "", False, False),
    ],
    "ServerReflectionResponse": [
        ("valid_host", 1, STRING, "", False, False),
        ("original_request", 2, MESSAGE, "ServerReflectionRequest", False, False),
        ("file_descriptor_response", 4, MESSAGE, "FileDescriptorResponse", False, True),
        ("all_extension_numbers_response", 5, MESSAGE, "ExtensionNumberResponse", False, True),
        ("list_services_response", 6, MESSAGE, "ListServiceResponse", False, True),
        ("error_response", 7, MESSAGE, "ErrorResponse", False, True),
    ],
    "FileDescriptorResponse": [("file_descriptor_proto", 1, BYTES, "", True, False)],
    "ExtensionNumberResponse": [
        ("base_type_name", 1, STRING, "", False, False),
        ("extension_number", 2, INT32, "", True, False),
    ],
    "ListServiceResponse": [("service", 1, MESSAGE, "ServiceResponse", True, False)],
    "ServiceResponse": [("name", 1, STRING, "", False, False)],
    "ErrorResponse": [
        ("error_code", 1, INT32, "", False, False),
        ("error_message", 2, STRING, "", False, False),
    ],
}


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple[int, int, str, int]]:
    return {f.name: (f.number, f.type, f.type_name, f.label) for f in message.field}


def _v1_client_file() -> descriptor_pb2.FileDescriptorProto:
    out = descriptor_pb2.FileDescriptorProto(
        name="test/reflection_v1.proto", package=V1, syntax="proto3"
    )
    for name, fields in V1_LAYOUT.items():
        message = out.message_type.add(name=name)
        if any(oneof for *_, oneof in fields):
            message.oneof_decl.add(
                name="message_request" if "Request" in name else "message_response"
            )
        for field, number, kind, type_name, repeated, oneof in fields:
            f = message.field.add(name=field, number=number, type=kind)
            f.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            if type_name:
                f.type_name = f".{V1}.{type_name}"
            if oneof:
                f.oneof_index = 0
    return out


@pytest.fixture(scope="module")
def v1_messages():
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_v1_client_file())
    return tuple(
        GetMessageClass(pool.FindMessageTypeByName(f"{V1}.{name}"))
        for name in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


def _v1_info(orchestrator, v1_messages, requests: list) -> list:
    request_type, response_type = v1_messages
    with orchestrator.channel() as channel:
        call = channel.stream_stream(
            f"/{V1}.ServerReflection/ServerReflectionInfo",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return list(call(iter([request_type(**r) for r in requests]), timeout=30))


def test_reflection_v1_lists_and_describes_the_service(orchestrator, v1_messages):
    listed, described, reflection = _v1_info(
        orchestrator,
        v1_messages,
        [
            {"list_services": ""},
            {"file_containing_symbol": "icl.reid.v1.PersonSearch"},
            {"file_containing_symbol": f"{V1}.ServerReflection"},
        ],
    )
    names = {s.name for s in listed.list_services_response.service}
    assert {
        "icl.reid.v1.PersonSearch",
        "grpc.health.v1.Health",
        f"{V1}.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    api = next(f for f in files if f.package == "icl.reid.v1")
    service = next(s for s in api.service if s.name == "PersonSearch")
    assert {m.name for m in service.method} == {
        "Search",
        "Enroll",
        "Delete",
        "SearchStream",
        "ListImages",
        "GetImage",
        "GetGalleryStats",
    }
    assert api.name == pb.DESCRIPTOR.name
    # The v1 service describes itself with upstream's message layout.
    (served,) = (
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in reflection.file_descriptor_response.file_descriptor_proto
    )
    assert (served.name, served.package) == ("grpc/reflection/v1/reflection.proto", V1)
    expected = {m.name: _fields(m) for m in _v1_client_file().message_type}
    assert {m.name: _fields(m) for m in served.message_type} == expected
    (method,) = served.service[0].method
    assert (method.input_type, method.output_type) == (
        f".{V1}.ServerReflectionRequest",
        f".{V1}.ServerReflectionResponse",
    )
    assert method.client_streaming and method.server_streaming


def test_reflection_v1_reports_unknown_symbols(orchestrator, v1_messages):
    (reply,) = _v1_info(orchestrator, v1_messages, [{"file_containing_symbol": "no.such.Thing"}])
    assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_v1alpha_still_served(orchestrator):
    with orchestrator.channel() as channel:
        stub = v1alpha_grpc.ServerReflectionStub(channel)
        request = v1alpha_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=30))
    names = {s.name for s in reply.list_services_response.service}
    assert {"icl.reid.v1.PersonSearch", "grpc.reflection.v1alpha.ServerReflection"} <= names
