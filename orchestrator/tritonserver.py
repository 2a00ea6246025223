"""Launch and supervise the real `tritonserver` binary that the nvidia-pytriton wheel ships.

That wheel carries Triton 2.51 with only the python backend, which is all the CPU flavour
needs. Three details make it work from a virtualenv (docs/serving.md):
- the python backend stub must sit in `backends/python/` (copied there once, so its RPATH
  into the wheel keeps working);
- the stub must run this interpreter's environment: the venv's `bin` goes first on PATH;
- the stub must load this interpreter's libpython: its LIBDIR goes first on LD_LIBRARY_PATH.
Each launch uses its own shared-memory prefix, so the regions a server created in /dev/shm
are removed exactly, when it stops or dies. The process itself is run by
`orchestrator/supervisor.py`.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from icl.orchestrator.supervisor import (
    ProcessSupervisor,
    ServerStartError,
    SupervisedServer,
    http_ok,
)

_LOAD_FAILURE_MARKERS = ("failed to load", "Invalid argument", "error:", "unexpected")


class TritonLaunchError(ServerStartError):
    """tritonserver did not become ready; the message names the failing models."""


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - only without the [serve] extra
        raise TritonLaunchError(
            "tritonserver is not installed: install the serving extra, pip install -e '.[serve]'"
        ) from exc
    return Path(pytriton.__file__).parent / "tritonserver"


def ensure_python_backend() -> Path:
    """Return Triton's backend dir, with the stub for this Python copied into place."""
    root = _pytriton_root()
    backends = root / "backends"
    stub = backends / "python" / "triton_python_backend_stub"
    if not stub.exists():
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        source = root / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not source.exists():
            raise TritonLaunchError(f"nvidia-pytriton ships no python backend stub for {version}")
        tmp = stub.with_suffix(f".{os.getpid()}.tmp")
        shutil.copy2(source, tmp)
        os.replace(tmp, stub)  # atomic: concurrent launchers never see half a file
    return backends


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    return env


@dataclass
class TritonServer(SupervisedServer):
    """A tritonserver process on loopback ports. Use as a context manager or call stop().

    If the server dies on its own, its stubs and shared memory are cleaned up at once;
    `running` turns False and `returncode` says how it ended.
    """

    model_repository: Path
    log_path: Path
    grpc_port: int = 0
    http_port: int = 0
    startup_timeout_s: float = 120.0
    # Triton's own Prometheus metrics (nv_inference_count, queue and compute times per model)
    # at http://127.0.0.1:PORT/metrics; None: off. 0: a free port.
    metrics_port: int | None = None
    # Address the server binds (loopback by default; 0.0.0.0 inside a container).
    host: str = "127.0.0.1"
    shm_prefix: str = field(default_factory=lambda: f"icl_{uuid.uuid4().hex[:12]}_")
    _supervisor: ProcessSupervisor | None = field(default=None, init=False, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str | None:
        return (
            None if self.metrics_port is None else f"http://127.0.0.1:{self.metrics_port}/metrics"
        )

    def _metrics_flags(self) -> list[str]:
        if self.metrics_port is None:
            return ["--allow-metrics=false"]
        # CPU only here: no GPU (DCGM) metrics; per-model inference and CPU metrics on loopback.
        return [
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
        ]

    def command(self) -> list[str]:
        backends = ensure_python_backend()
        return [
            str(_pytriton_root() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            *self._metrics_flags(),
            "--pinned-memory-pool-byte-size=0",
            "--exit-timeout-secs=5",
            "--strict-readiness=true",
            "--exit-on-error=true",
        ]

    def start(self) -> TritonServer:
        if not (self.model_repository / "text_encoder").is_dir():
            raise TritonLaunchError(f"{self.model_repository} holds no text_encoder model")
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        if self.metrics_port == 0:
            self.metrics_port = free_port()
        self._supervisor = ProcessSupervisor(
            "tritonserver",
            self.command(),
            self.log_path,
            env=_environment(),
            on_exit=[lambda _code: self._remove_shm_regions()],
        )
        ready_url = f"http://{self.http_url}/v2/health/ready"
        self._supervisor.start(
            lambda: http_ok(ready_url),
            self.startup_timeout_s,
            error=TritonLaunchError,
            summary=self.failure_summary,
            context=f"while loading {self.model_repository}",
        )
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def failure_summary(self) -> str:
        """The log lines that say which model failed and why (or the log's tail)."""
        lines = [ln.strip() for ln in self.log_text().splitlines() if ln.strip()]
        bad = [ln for ln in lines if any(m in ln for m in _LOAD_FAILURE_MARKERS)]
        bad = [ln for ln in bad if "CudaDriverHelper" not in ln]
        picked = bad[:6] or lines[-6:]
        return " | ".join(picked) + f" (full log: {self.log_path})"

    def _remove_shm_regions(self) -> None:
        for region in Path("/dev/shm").glob(f"{self.shm_prefix}*"):
            region.unlink(missing_ok=True)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server and its stubs, remove its shared memory; a no-op once it is gone."""
        if self._supervisor is not None:
            self._supervisor.stop(timeout_s)
        self._remove_shm_regions()  # also after a crash of the launcher that started it

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
