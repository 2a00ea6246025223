"""Shared fixtures: a real tritonserver (CPU) and real orchestrator processes on loopback.

Everything a fixture starts it stops, by PID, and the session ends by checking that no
tritonserver it launched and no shared-memory region it created is left behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from icl.demo import DEMO_WEIGHTS, demo_path
from icl.export.mllm_repository import write_mllm_model
from icl.export.repository import write_repository
from icl.models.dual_encoder import load_checkpoint
from icl.orchestrator.tritonserver import TritonServer
from tests.helpers import LAUNCHED, RunningOrchestrator, start_orchestrator, start_triton


@pytest.fixture(scope="session")
def demo_model():
    return load_checkpoint(demo_path(DEMO_WEIGHTS))


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory, demo_model) -> Path:
    out = tmp_path_factory.mktemp("model_repository")
    write_repository(demo_model, out)
    write_mllm_model(out, "demo", None)  # THI's MLLM; only orchestrators told to use it do
    return out


@pytest.fixture(scope="session")
def triton(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServer]:
    server = start_triton(model_repository, tmp_path_factory.mktemp("triton") / "server.log")
    yield server
    server.stop()


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
