"""`icl export --mllm ...`: the three-terminal story without `icl demo`.

Real, end to end, as an operator runs it: `icl export --mllm demo` writes the repository,
`icl triton` serves it (the real tritonserver, CPU), `icl serve --mllm-model mllm` runs the
service against it, a few demo crops are enrolled through Enroll and a THI Search returns a
trace that asked the MLLM. The other choices are checked on what export writes (qwen2vl and
vllm need a Qwen2-VL directory; their serving is tested in test_mllm_triton.py and
test_mllm_vllm_adapter.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from icl.orchestrator.tritonserver import free_port
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb, pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator, start_triton

ICL = [sys.executable, "-m", "icl.cli"]


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1):
            return True
    except OSError:
        return False


def test_export_triton_serve_gives_thi_with_the_demo_mllm(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [*ICL, "export", "--out", str(repo), "--mllm", "demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "MLLM (demo) written" in proc.stdout
    assert _config(repo / "mllm" / "config.pbtxt").parameters["backend"].string_value == "demo"

    grpc_port, http_port = free_port(), free_port()
    log = tmp_path / "triton.out"
    with open(log, "wb") as out:
        triton = subprocess.Popen(
            [
                *ICL,
                "triton",
                "--model-repository",
                str(repo),
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--log-file",
                str(tmp_path / "tritonserver.log"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = None
    try:
        deadline = time.monotonic() + 120
        while not _ready(http_port):
            assert triton.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "icl triton not ready in 120 s"
            time.sleep(0.5)
        service = start_orchestrator(
            f"127.0.0.1:{grpc_port}",
            tmp_path / "gallery.db",
            tmp_path / "serve.log",
            args=["--mllm-model", "mllm"],
        )
        demo = list(demo_gallery(24, seed=3))
        with service.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            results = enroll_all(stub, gallery_images(demo))
            assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
            request = search_request(demo_queries(seed=3, count=1)[0], top_k=5)
            request.thi.enabled = True
            reply = stub.Search(request, timeout=120)
        assert len(reply.hits) == 5
        trace = reply.thi_trace
        assert trace.mllm_calls >= 1  # the MLLM was asked, through Triton's `mllm`
        asked = [c for c in trace.candidates if c.asked]
        assert asked and all(0.0 <= c.p_yes <= 1.0 for c in asked)
        assert trace.fallback_reason or trace.anchor_image_id
    finally:
        if service is not None:
            service.stop()
        triton.send_signal(signal.SIGTERM)
        try:
            triton.wait(timeout=30)
        except subprocess.TimeoutExpired:
            triton.kill()
            triton.wait()


def test_export_writes_each_mllm_choice(tmp_path: Path) -> None:
    """Static: what `--mllm qwen2vl` and `--mllm vllm` write (no Qwen2-VL weights here)."""
    from icl.cli.export import mllm_writer

    (folder,) = mllm_writer("qwen2vl", "/models/Qwen2-VL-7B-Instruct", '{"device": "cuda"}')(
        tmp_path / "a"
    )
    config = _config(folder / "config.pbtxt")
    assert config.parameters["backend"].string_value == "qwen2vl"
    assert config.parameters["path"].string_value == "/models/Qwen2-VL-7B-Instruct"
    assert json.loads(config.parameters["options"].string_value) == {"device": "cuda"}
    front, back = mllm_writer("vllm", "/models/Qwen2-VL-7B-Instruct", "{}")(tmp_path / "b")
    assert (front.name, back.name) == ("mllm", "mllm_vllm")
    assert _config(back / "config.pbtxt").backend == "vllm"
    engine = json.loads((back / "1" / "model.json").read_text())
    assert engine["model"] == "/models/Qwen2-VL-7B-Instruct"
    assert mllm_writer("none", "", "{}") is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mllm", "llava"], "--mllm must be one of"),
        (["--mllm", "vllm"], "needs --mllm-path"),
        (["--mllm", "demo", "--mllm-options", "{nope"], "not JSON"),
        (["--mllm", "vllm", "--mllm-path", "/m", "--mllm-options", '{"colour": 1}'], "colour"),
    ],
)
def test_bad_mllm_choices_fail_clearly(tmp_path: Path, args: list[str], message: str) -> None:
    proc = subprocess.run(
        [*ICL, "export", "--out", str(tmp_path / "r"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error:") and message in proc.stderr


def test_the_mllm_can_live_in_its_own_triton(tmp_path: Path) -> None:
    """The GPU layout on CPU: `--mllm-out` puts the MLLM in its own repository, served by a
    second tritonserver; `icl serve --mllm-url` reaches it while the encoders' Triton has no
    `mllm` at all."""
    encoders, mllm_repo = tmp_path / "encoders", tmp_path / "mllm"
    proc = subprocess.run(
        [*ICL, "export", "--out", str(encoders), "--mllm", "demo", "--mllm-out", str(mllm_repo)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert not (encoders / "mllm").exists() and (mllm_repo / "mllm" / "config.pbtxt").is_file()
    shutil.copytree(encoders / "text_encoder", mllm_repo / "text_encoder")  # launcher's rule
    enc_server = start_triton(encoders, tmp_path / "enc.log")
    mllm_server = start_triton(mllm_repo, tmp_path / "mllm.log")
    service = None
    try:
        service = start_orchestrator(
            enc_server.grpc_url,
            tmp_path / "gallery.db",
            tmp_path / "serve.log",
            args=["--mllm-model", "mllm", "--mllm-url", mllm_server.grpc_url],
        )
        demo = list(demo_gallery(12, seed=4))
        with service.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo))
            request = search_request(demo_queries(seed=4, count=1)[0], top_k=5)
            request.thi.enabled = True
            reply = stub.Search(request, timeout=120)
        assert reply.thi_trace.mllm_calls >= 1
    finally:
        if service is not None:
            service.stop()
        mllm_server.stop()
        enc_server.stop()
