"""The API package's client against a real gRPC server on 127.0.0.1: plain, TLS and mutual
TLS, the bearer token on every call (sync and asyncio), deadlines, and its dependencies.

The server here is a tiny PersonSearch servicer that echoes what it received, so the test
sees exactly what the client put on the wire; the real service is tested elsewhere."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest

from icl_api import AsyncPersonSearchClient, PersonSearchClient, TlsOptions, pb, pb_grpc
from tests.tls_certs import make_certs


class Echo(pb_grpc.PersonSearchServicer):
    """Search answers with one hit whose image_id is the caller's authorization header."""

    def Search(self, request, context):
        if request.text == "slow":
            time.sleep(2)
        auth = dict(context.invocation_metadata()).get("authorization", "")
        return pb.SearchResponse(hits=[pb.Hit(image_id=auth, camera_id=request.text)])

    def Enroll(self, request_iterator, context):
        auth = dict(context.invocation_metadata()).get("authorization", "")
        for request in request_iterator:
            yield pb.EnrollResponse(
                results=[pb.EnrollResult(image_id=auth, reason=i.image_id) for i in request.images]
            )

    def Delete(self, request, context):
        return pb.DeleteResponse(deleted=len(request.image_ids))


def _serve(credentials: grpc.ServerCredentials | None) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_PersonSearchServicer_to_server(Echo(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.unit
def test_plain_channel_carries_the_token_and_the_deadline():
    server, address = _serve(None)
    try:
        with PersonSearchClient(address, token="s3cret") as client:
            reply = client.search(text="a man in red", top_k=3)
            assert reply.hits[0].image_id == "Bearer s3cret"
            assert reply.hits[0].camera_id == "a man in red"
            acks = list(client.enroll([pb.GalleryImage(image_id=f"i{n}") for n in range(5)], 2))
            assert [len(a.results) for a in acks] == [2, 2, 1]
            assert {r.image_id for a in acks for r in a.results} == {"Bearer s3cret"}
            assert client.delete(image_ids=["a", "b"]).deleted == 2
            with pytest.raises(grpc.RpcError) as exc:
                client.search(text="slow", timeout_s=0.3)
            assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with PersonSearchClient(address) as client:  # no token: no header
            assert client.search(text="x").hits[0].image_id == ""
    finally:
        server.stop(None)


@pytest.mark.unit
def test_tls_and_mutual_tls(certs, tmp_path):
    server_creds = grpc.ssl_server_credentials(
        [(certs.server_key.read_bytes(), certs.server_cert.read_bytes())],
        root_certificates=certs.ca.read_bytes(),
        require_client_auth=True,
    )
    server, address = _serve(server_creds)
    try:
        mutual = TlsOptions(certs.ca, certs.client_cert, certs.client_key)
        with PersonSearchClient(address, tls=mutual, token="t0k") as client:
            assert client.search(text="x").hits[0].image_id == "Bearer t0k"

        async def run() -> str:
            async with AsyncPersonSearchClient(address, tls=mutual, token="t0k") as client:
                reply = await client.search(text="x")
                acks = [a async for a in client.enroll([pb.GalleryImage(image_id="i")])]
                assert acks[0].results[0].image_id == "Bearer t0k"
                return reply.hits[0].image_id

        assert asyncio.run(run()) == "Bearer t0k"

        # Without a client certificate, or trusting another CA, the call fails.
        with PersonSearchClient(address, tls=TlsOptions(certs.ca), timeout_s=5) as client:
            with pytest.raises(grpc.RpcError) as exc:
                client.search(text="x")
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        other = make_certs(tmp_path / "other", ca_name="another CA")
        wrong_ca = TlsOptions(other.ca, other.client_cert, other.client_key)
        with PersonSearchClient(address, tls=wrong_ca, timeout_s=5) as client:
            with pytest.raises(grpc.RpcError) as exc:
                client.search(text="x")
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)
    with pytest.raises(ValueError, match="key"):
        TlsOptions(certs.ca, cert_file=certs.client_cert).credentials()


@pytest.mark.unit
def test_api_package_loads_only_grpc_and_protobuf():
    """Importing icl_api pulls in no module of the ML core, the service or numpy/torch."""
    code = (
        "import sys, icl_api; "
        "tops = {m.split('.')[0] for m in sys.modules}; "
        "print(' '.join(sorted(tops - set(sys.stdlib_module_names))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # grpc itself loads its sibling packages (grpc_health, grpc_reflection, ...); names with
    # a leading underscore and cython_runtime are interpreter and install machinery.
    third_party = {
        name for name in out.stdout.split() if not name.startswith(("_", "grpc", "cython_runtime"))
    }
    assert third_party <= {"icl_api", "google", "typing_extensions"}, third_party
