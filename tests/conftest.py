"""Shared fixtures: a real tritonserver (CPU) and real orchestrator processes on loopback.

Everything a fixture starts it stops, by PID, and the session ends by checking that no
tritonserver it launched and no shared-memory region it created is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from icl.export.repository import write_repository
from icl.orchestrator.tritonserver import TritonServer, free_port
from icl.synthetic.demo_gallery import random_demo_encoder
from tests.helpers import LAUNCHED, start_triton


@pytest.fixture(scope="session")
def demo_model():
    return random_demo_encoder(seed=0)


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, demo_model) -> Path:
    out = tmp_path_factory.mktemp("model_repository")
    write_repository(demo_model, out)
    return out


@pytest.fixture(scope="session")
def triton(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    server = start_triton(model_repository, tmp_path_factory.mktemp("triton") / "server.log")
    yield server
    server.stop()


@dataclass
class RunningOrchestrator:
    process: subprocess.Popen[bytes]
    address: str
    log: Path

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_orchestrator(
    triton_url: str, milvus_uri: Path, log: Path, **env: str
) -> RunningOrchestrator:
    """`icl serve` in its own process; returns once its gRPC health check says SERVING."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "icl.cli",
        "serve",
        "--triton-url",
        triton_url,
        "--milvus-uri",
        str(milvus_uri),
        "--port",
        str(port),
        "-v",
    ]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env}
        )
    running = RunningOrchestrator(proc, f"127.0.0.1:{port}", log)
    deadline = time.monotonic() + 90
    with running.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"icl serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return running
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                running.stop()
                raise RuntimeError(f"icl serve not healthy in time:\n{log.read_text()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def orchestrator(
    triton: TritonServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningOrchestrator]:
    work = tmp_path_factory.mktemp("orchestrator")
    running = start_orchestrator(triton.grpc_url, work / "gallery.db", work / "serve.log")
    yield running
    running.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for server in LAUNCHED:
        server.stop()
        leftovers = list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))
        assert not leftovers, f"shared-memory regions left behind: {leftovers}"
