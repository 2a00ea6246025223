"""The launcher names the model that failed to load and why, and never hangs."""

from __future__ import annotations

import asyncio
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

from icl.export.repository import write_gpu_repository
from icl.orchestrator.triton.encoders import TritonEncoders
from icl.orchestrator.tritonserver import TritonLaunchError, free_port
from tests.helpers import group_members, proc_state, start_triton, wait_until


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _launch_fails(repo: Path, log: Path) -> str:
    began = time.monotonic()
    with pytest.raises(TritonLaunchError) as info:
        start_triton(repo, log, startup_timeout_s=60)
    assert time.monotonic() - began < 60
    return str(info.value)


def test_missing_onnx_file(model_repository, tmp_path):
    repo = _copy(model_repository, tmp_path / "repo")
    (repo / "image_encoder/1/model.onnx").unlink()
    message = _launch_fails(repo, tmp_path / "log")
    assert "image_encoder" in message and "model.onnx" in message


def test_corrupt_onnx_file(model_repository, tmp_path):
    repo = _copy(model_repository, tmp_path / "repo")
    (repo / "text_encoder/1/model.onnx").write_bytes(b"this is not a protobuf")
    message = _launch_fails(repo, tmp_path / "log")
    assert "text_encoder" in message


def test_shape_in_config_does_not_match_graph(model_repository, tmp_path):
    repo = _copy(model_repository, tmp_path / "repo")
    path = repo / "image_encoder/config.pbtxt"
    config = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert list(config.input[0].dims) == [96, 32, 3]
    for dims in (config.input[0].dims, *(w.inputs["PIXELS"].dims for w in config.model_warmup)):
        del dims[-1]  # PIXELS [96, 32]: the graph has [96, 32, 3]
    path.write_text(text_format.MessageToString(config))
    message = _launch_fails(repo, tmp_path / "log")
    assert "image_encoder" in message


def test_missing_config(model_repository, tmp_path):
    repo = _copy(model_repository, tmp_path / "repo")
    (repo / "text_encoder/config.pbtxt").unlink()
    message = _launch_fails(repo, tmp_path / "log")
    assert "text_encoder" in message


def test_gpu_repository_on_a_cpu_server(demo_model, tmp_path):
    """No TensorRT backend and no GPU here: the launcher names the plan models, fast."""
    repo = tmp_path / "repo"
    write_gpu_repository(demo_model, repo)
    message = _launch_fails(repo, tmp_path / "log")
    assert "_encoder_trt" in message and "tensorrt" in message


def test_corrupt_tokenizer_file_next_to_the_graph(model_repository, tmp_path):
    repo = _copy(model_repository, tmp_path / "repo")
    (repo / "text_encoder/1/tokenizer.json").write_text("{not json")
    message = _launch_fails(repo, tmp_path / "log")
    assert "text_encoder" in message


def test_server_dies_with_a_killed_launcher(model_repository, tmp_path):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from icl.orchestrator.tritonserver import TritonServer\n"
        "s = TritonServer(Path(sys.argv[1]), Path(sys.argv[2])).start()\n"
        "print(s.process.pid, s.shm_prefix, flush=True)\n"
        "time.sleep(600)\n"
    )
    launcher = subprocess.Popen(
        [sys.executable, "-c", script, str(model_repository), str(tmp_path / "log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    prefix = None
    try:
        pid, prefix = launcher.stdout.readline().split()
        launcher.kill()  # SIGKILL: the launcher gets no chance to clean up
        launcher.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not Path(f"/proc/{pid}").exists(), "tritonserver outlived its launcher"
    finally:
        launcher.kill()
        for region in Path("/dev/shm").glob(f"{prefix}*") if prefix else ():
            region.unlink(missing_ok=True)


def _shm_regions(prefix: str) -> list[Path]:
    return list(Path("/dev/shm").glob(f"{prefix}*"))


def test_a_killed_server_is_reaped_and_cleaned_up_at_once(model_repository, tmp_path):
    """Defect: a SIGKILLed tritonserver stayed a zombie of the launching process, and its
    python-backend stubs and /dev/shm regions stayed alive until that process exited."""
    server = start_triton(model_repository, tmp_path / "log")
    assert server.process is not None
    pid = server.process.pid
    stubs = [p for p in group_members(pid) if p != pid]
    assert stubs, "no python-backend stub runs in the server's process group"
    assert _shm_regions(server.shm_prefix), "the stubs created no shared memory"

    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    assert wait_until(lambda: proc_state(pid) is None, 5), f"pid {pid}: {proc_state(pid)}"
    with pytest.raises(ChildProcessError):  # reaped, not a zombie waiting for us
        os.waitpid(pid, os.WNOHANG)
    assert wait_until(lambda: not group_members(pid), 5), f"alive: {group_members(pid)}"
    assert all(proc_state(p) in (None, "Z") for p in stubs)
    assert wait_until(lambda: not _shm_regions(server.shm_prefix), 5)
    assert time.monotonic() - began < 5
    assert not server.running and server.returncode == -signal.SIGKILL
    server.stop()  # a no-op now: it does not raise
    assert server.process is None and server.returncode == -signal.SIGKILL


def test_icl_triton_exits_with_one_line_when_the_server_dies(model_repository, tmp_path):
    """`icl triton` tells that tritonserver died and exits, instead of waiting forever."""
    log = tmp_path / "server.log"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "icl.cli",
            "triton",
            "--model-repository",
            str(model_repository),
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--log-file",
            str(log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "tritonserver ready" in cli.stdout.readline()
        os.kill(_pgid_of_child(cli.pid), signal.SIGKILL)  # the server leads its group
        _, stderr = cli.communicate(timeout=20)
    finally:
        cli.kill()
        cli.wait()
    assert cli.returncode == 2
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "tritonserver died (exit code -9)" in lines[0], stderr
    assert str(log) in lines[0]


def _pgid_of_child(ppid: int) -> int:
    """The process group of ppid's one child (the supervised server leads its own group)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == ppid:
            return int(fields[2])
    raise AssertionError(f"process {ppid} has no child")


def _inference_count(metrics_url: str, model: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith("nv_inference_count{") and f'model="{model}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no nv_inference_count for {model} in:\n{text[:2000]}")


def test_icl_triton_serves_tritons_metrics_when_asked(model_repository, tmp_path):
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "icl.cli",
            "triton",
            "--model-repository",
            str(model_repository),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--metrics-port",
            str(metrics_port),
            "--log-file",
            str(tmp_path / "server.log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    async def encode(texts: list[str]) -> None:
        encoders = TritonEncoders(f"127.0.0.1:{grpc_port}")
        try:
            await encoders.start(30)
            for text in texts:
                await encoders.encode_texts([text])
        finally:
            await encoders.close()

    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        assert f"metrics {url}" in cli.stdout.readline()
        before = _inference_count(url, "text_encoder")
        asyncio.run(encode(["a man in a red jacket", "a woman with a backpack", "a child"]))
        # Triton counts a request once its statistics are written: poll briefly.
        assert wait_until(lambda: _inference_count(url, "text_encoder") == before + 3, 5)
    finally:
        cli.send_signal(signal.SIGTERM)
        try:
            cli.wait(timeout=30)
        except subprocess.TimeoutExpired:
            cli.kill()
            cli.wait()
    assert cli.returncode == 0, cli.stderr.read()
