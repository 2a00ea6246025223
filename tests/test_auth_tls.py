"""Bearer tokens, TLS and mutual TLS on the PersonSearch service: real `icl serve` processes
(one with a tokens file on plaintext loopback, one with TLS + client certificates + tokens)
against the session's real tritonserver, called through the real client and CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icl.orchestrator.auth import TokensFileError, TokenTable, bearer_token, needed_permission
from icl.orchestrator.server import SERVICE_NAME, is_loopback
from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb
from icl_api.client import PersonSearchClient, TlsOptions
from tests.helpers import RunningOrchestrator, gallery_images, start_orchestrator
from tests.tls_certs import Certs, make_certs

TOKENS = {
    "searcher": ("search-only-token-0123456789abcdef", ["search"]),
    "loader": ("enroll-only-token-0123456789abcdef", ["enroll"]),
    "operator": ("admin-token-0123456789abcdef-ZZZZ", ["admin"]),
}
WRONG = "wrong-token-3c9e1f4a77b2d6e0-NEVER-LOGGED"


def _tokens_file(folder: Path) -> Path:
    path = folder / "tokens.json"
    path.write_text(
        json.dumps({"tokens": {n: {"token": t, "permissions": p} for n, (t, p) in TOKENS.items()}})
    )
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def authed(triton, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningOrchestrator]:
    """Plaintext loopback with tokens."""
    work = tmp_path_factory.mktemp("authed")
    running = start_orchestrator(
        triton.grpc_url,
        work / "gallery.db",
        work / "serve.log",
        args=["--tokens-file", str(_tokens_file(work))],
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls(triton, certs: Certs, tmp_path_factory) -> Iterator[RunningOrchestrator]:
    """TLS with required client certificates, and tokens; configured through the environment."""
    work = tmp_path_factory.mktemp("mtls")
    running = start_orchestrator(
        triton.grpc_url,
        work / "gallery.db",
        work / "serve.log",
        tls=TlsOptions(certs.ca, certs.client_cert, certs.client_key),
        ICL_TLS_CERT=str(certs.server_cert),
        ICL_TLS_KEY=str(certs.server_key),
        ICL_TLS_CLIENT_CA=str(certs.ca),
        ICL_TOKENS_FILE=str(_tokens_file(work)),
    )
    yield running
    running.stop()


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


def _calls(client: PersonSearchClient, image_id: str) -> dict:
    image = gallery_images(demo_gallery(1, seed=41))[0]
    image.image_id = image_id
    return {
        "Search": lambda: client.search(text="a man in a blue coat", top_k=3),
        "Enroll": lambda: list(client.enroll([image], timeout_s=60)),
        "Delete": lambda: client.delete(image_ids=[image_id]),
    }


def test_no_token_is_unauthenticated(authed):
    with PersonSearchClient(authed.address) as client:
        for name, call in _calls(client, "no-token").items():
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
            assert "Bearer" in details


def test_wrong_token_is_unauthenticated_and_never_echoed(authed):
    with PersonSearchClient(authed.address, token=WRONG) as client:
        for name, call in _calls(client, "wrong-token").items():
            code, details = _code(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, name
            assert WRONG not in details and "NEVER" not in details
    log = authed.log.read_text()
    assert "UNAUTHENTICATED" in log  # the refusals are logged ...
    assert WRONG not in log and "NEVER-LOGGED" not in log  # ... without the token
    for token, _ in TOKENS.values():  # nor any configured one (the start line lists the config)
        assert token not in log


def test_search_token_may_search_only(authed):
    token = TOKENS["searcher"][0]
    with PersonSearchClient(authed.address, token=token) as client:
        calls = _calls(client, "searcher-item")
        assert isinstance(calls["Search"](), pb.SearchResponse)
        for name in ("Enroll", "Delete"):
            code, details = _code(calls[name])
            assert code == grpc.StatusCode.PERMISSION_DENIED, name
            assert "'searcher'" in details and token not in details


def test_enroll_token_may_enroll_and_delete_but_not_search(authed):
    with PersonSearchClient(authed.address, token=TOKENS["loader"][0]) as client:
        calls = _calls(client, "loader-item")
        [response] = calls["Enroll"]()
        assert response.results[0].status == pb.EnrollResult.ACCEPTED
        assert calls["Delete"]().deleted == 1
        assert _code(calls["Search"])[0] == grpc.StatusCode.PERMISSION_DENIED


def test_admin_token_may_do_everything(authed):
    with PersonSearchClient(authed.address, token=TOKENS["operator"][0]) as client:
        calls = _calls(client, "admin-item")
        [response] = calls["Enroll"]()
        assert response.results[0].status == pb.EnrollResult.ACCEPTED
        hits = calls["Search"]().hits
        assert [h.image_id for h in hits] == ["admin-item"]
        assert calls["Delete"]().deleted == 1


def test_health_needs_no_token(authed):
    with authed.channel() as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_mutual_tls_with_client_certificate_works(mtls, certs):
    tls = TlsOptions(certs.ca, certs.client_cert, certs.client_key)
    with PersonSearchClient(mtls.address, tls=tls, token=TOKENS["operator"][0]) as client:
        calls = _calls(client, "tls-item")
        [response] = calls["Enroll"]()
        assert response.results[0].status == pb.EnrollResult.ACCEPTED
        assert [h.image_id for h in calls["Search"]().hits] == ["tls-item"]
    # Over TLS the token is still checked.
    with PersonSearchClient(mtls.address, tls=tls) as client:
        assert _code(_calls(client, "x")["Search"])[0] == grpc.StatusCode.UNAUTHENTICATED


def test_tls_without_client_certificate_fails(mtls, certs):
    with PersonSearchClient(
        mtls.address, tls=TlsOptions(certs.ca), token=TOKENS["operator"][0], timeout_s=5
    ) as client:
        assert _code(_calls(client, "x")["Search"])[0] == grpc.StatusCode.UNAVAILABLE


def test_plaintext_to_the_tls_port_fails(mtls):
    with PersonSearchClient(mtls.address, token=TOKENS["operator"][0], timeout_s=5) as client:
        assert _code(_calls(client, "x")["Search"])[0] == grpc.StatusCode.UNAVAILABLE


def test_client_trusting_another_ca_fails(mtls, certs, tmp_path):
    other = make_certs(tmp_path / "other", ca_name="another CA")
    tls = TlsOptions(other.ca, certs.client_cert, certs.client_key)
    with PersonSearchClient(mtls.address, tls=tls, timeout_s=5) as client:
        assert _code(_calls(client, "x")["Search"])[0] == grpc.StatusCode.UNAVAILABLE


def _icl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "icl.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **env},
    )


def test_cli_search_with_token_and_mutual_tls(mtls, certs):
    tls_args = [
        "--ca-file",
        str(certs.ca),
        "--cert-file",
        str(certs.client_cert),
        "--key-file",
        str(certs.client_key),
    ]
    search = ["search", "--address", mtls.address, "--text", "a person", *tls_args]
    ok = _icl(*search, "--token", TOKENS["searcher"][0])
    assert ok.returncode == 0, ok.stderr
    assert "Search: a person" in ok.stdout
    # From the environment too; a wrong one fails with the code and without the token.
    bad = _icl(*search, ICL_TOKEN=WRONG)
    assert bad.returncode != 0
    assert "UNAUTHENTICATED" in bad.stderr and WRONG not in bad.stderr + bad.stdout


def test_cli_enroll_refused_token_is_not_an_outage(mtls, certs, tmp_path):
    crops = tmp_path / "crops" / "cam-01"
    crops.mkdir(parents=True)
    (crops / "a.png").write_bytes(gallery_images(demo_gallery(1, seed=43))[0].image)
    out = _icl(
        "enroll",
        str(tmp_path / "crops"),
        "--address",
        mtls.address,
        "-q",
        "--ca-file",
        str(certs.ca),
        "--cert-file",
        str(certs.client_cert),
        "--key-file",
        str(certs.client_key),
        ICL_TOKEN=TOKENS["searcher"][0],
    )
    assert out.returncode != 0
    assert "PERMISSION_DENIED" in out.stderr and "went away" not in out.stderr
    assert TOKENS["searcher"][0] not in out.stderr + out.stdout


def test_cli_enroll_failed_handshake_says_so(mtls, certs, tmp_path):
    """A client that cannot finish the TLS handshake (no client certificate for a service that
    requires one) is told it cannot connect, not that the service went away mid-load."""
    crops = tmp_path / "crops" / "cam-01"
    crops.mkdir(parents=True)
    (crops / "a.png").write_bytes(gallery_images(demo_gallery(1, seed=44))[0].image)
    out = _icl(
        "enroll",
        str(tmp_path / "crops"),
        "--address",
        mtls.address,
        "-q",
        "--ca-file",
        str(certs.ca),
        ICL_TOKEN=TOKENS["loader"][0],
    )
    assert out.returncode == 2
    assert "cannot connect to the PersonSearch service" in out.stderr
    assert "went away" not in out.stderr and "Traceback" not in out.stderr


def test_help_shows_no_token(tmp_path):
    secret = "env-token-that-must-not-show-0123"
    out = _icl("search", "--help", ICL_TOKEN=secret)
    assert out.returncode == 0 and "--token" in out.stdout and secret not in out.stdout


@pytest.mark.unit
def test_token_table_lookup_and_permissions(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(
        '[tokens.cam]\ntoken = "0123456789abcdefXYZ"\npermissions = ["enroll"]\n'
        '[tokens.ops]\ntoken = "ops-0123456789abcdef"\npermissions = ["admin"]\n'
    )
    table = TokenTable.load(path)
    cam = table.lookup("0123456789abcdefXYZ")
    assert cam is not None and cam.name == "cam" and cam.may("enroll") and not cam.may("search")
    ops = table.lookup("ops-0123456789abcdef")
    assert ops is not None and ops.may("search") and ops.may("enroll") and ops.may("admin")
    assert table.lookup("0123456789abcdefXY") is None and table.lookup("") is None
    assert "0123456789abcdef" not in repr(table)
    assert needed_permission(f"/{SERVICE_NAME}/Search", SERVICE_NAME) == "search"
    assert needed_permission(f"/{SERVICE_NAME}/Delete", SERVICE_NAME) == "enroll"
    assert needed_permission(f"/{SERVICE_NAME}/Other", SERVICE_NAME) == "admin"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) is None


@pytest.mark.unit
@pytest.mark.parametrize(
    "body, words",
    [
        ('{"tokens": {}}', "non-empty `tokens`"),
        ('{"tokens": {"a": {"token": "short", "permissions": ["search"]}}}', "at least 16"),
        ('{"tokens": {"a": {"token": "0123456789abcdefgh", "permissions": ["root"]}}}', "search"),
        (
            '{"tokens": {"a": {"token": "0123456789abcdefgh", "permissions": ["search"]},'
            ' "b": {"token": "0123456789abcdefgh", "permissions": ["admin"]}}}',
            "twice",
        ),
        ('{"tokens": {"a": {"token": "0123456789abcdefgh"', "not valid JSON"),
    ],
)
def test_tokens_file_errors_name_the_entry_not_the_token(tmp_path, body, words):
    path = tmp_path / "tokens.json"
    path.write_text(body)
    with pytest.raises(TokensFileError) as info:
        TokenTable.load(path)
    assert words in str(info.value)
    assert "0123456789abcdefgh" not in str(info.value)


@pytest.mark.unit
def test_loopback_detection():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("[::]")


def test_warns_when_serving_beyond_loopback_unprotected(tmp_path):
    """Each run stops at the start (no Triton on that port), so nothing binds 0.0.0.0; the
    warning comes before anything can fail."""
    from icl.orchestrator.tritonserver import free_port

    common = ["serve", "--host", "0.0.0.0", "--port", "0", "--triton-wait", "1"]
    common += ["--triton-url", f"127.0.0.1:{free_port()}", "--milvus-uri", str(tmp_path / "g.db")]
    bare = _icl(*common)
    assert bare.returncode != 0
    assert bare.stderr.count("without TLS and without tokens") == 1, bare.stderr
    protected = _icl(*common, "--tokens-file", str(_tokens_file(tmp_path)))
    assert protected.returncode != 0
    assert "without TLS and without tokens" not in protected.stderr, protected.stderr
    loopback = _icl(*[a if a != "0.0.0.0" else "127.0.0.1" for a in common])
    assert "without TLS and without tokens" not in loopback.stderr


def test_streaming_and_browsing_need_the_search_permission(authed):
    """SearchStream and the browsing RPCs are reads: a search token may call them, an
    enroll-only token may not (and the token reaches the server on the streaming call too)."""

    def reads(client: PersonSearchClient) -> dict:
        return {
            "SearchStream": lambda: list(client.search_stream(text="a man", top_k=3)),
            "ListImages": lambda: client.list_images(page_size=5),
            "GetImage": lambda: client.get_image("no-such-image"),
            "GetGalleryStats": lambda: client.gallery_stats(),
        }

    with PersonSearchClient(authed.address, token=TOKENS["searcher"][0]) as client:
        calls = reads(client)
        assert calls["SearchStream"]()[-1].HasField("result")
        assert isinstance(calls["ListImages"](), pb.ListImagesResponse)
        assert _code(calls["GetImage"])[0] == grpc.StatusCode.NOT_FOUND  # past the token check
        assert isinstance(calls["GetGalleryStats"](), pb.GalleryStats)
    with PersonSearchClient(authed.address, token=TOKENS["loader"][0]) as client:
        for name, call in reads(client).items():
            assert _code(call)[0] == grpc.StatusCode.PERMISSION_DENIED, name
