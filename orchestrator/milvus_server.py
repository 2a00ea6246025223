"""Launch a real Milvus 2.3 standalone server from the PyPI package `milvus`, on loopback.

The package ships the standalone binary with embedded etcd and a config template. Its own
launcher (`milvus-server`) leaves the component addresses empty, so components advertise the
machine's network address, and it waits only 1 s before SIGKILL. This launcher renders the
template with free ports, pins every component to 127.0.0.1, and runs the binary under
`orchestrator/supervisor.py` (own process group, SIGTERM then SIGKILL after a timeout, reaped
at once if it dies), polling /healthz. Tests and benchmarks/gallery.py use it; production runs
Milvus 2.5+ from its compose file or Helm chart.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icl.orchestrator.supervisor import (
    ProcessSupervisor,
    ServerStartError,
    SupervisedServer,
    http_ok,
)
from icl.orchestrator.tritonserver import free_port

# Components that otherwise advertise (and some bind) the machine's first network address.
_COMPONENTS = (
    "rootCoord",
    "proxy",
    "queryCoord",
    "queryNode",
    "indexNode",
    "dataCoord",
    "dataNode",
)


def _reuse_addr(config_class: type) -> type:
    """The package's config test-binds each port without SO_REUSEADDR, so a port the last
    run served stays "in use" for a minute (TIME_WAIT) although Milvus itself (Go sets
    SO_REUSEADDR) could bind it: a restart on the same port, which its clients keep
    dialling, then failed. Test-bind the way Milvus binds."""

    class Config(config_class):  # a subclass of the package's config, made at run time
        def try_bind_port(self, port: int) -> socket.socket | None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return sock
            except (OSError, OverflowError):
                sock.close()
                return None

    return Config


class MilvusLaunchError(ServerStartError):
    """The Milvus server did not become healthy; the message has the log's tail."""


@dataclass
class MilvusServer(SupervisedServer):
    """A Milvus standalone process whose data lives under `data_dir`. Call stop() when done.

    If it dies on its own it is reaped at once; `running` turns False and `returncode` says
    how it ended.
    """

    data_dir: Path
    port: int = 0
    startup_timeout_s: float = 120.0
    metrics_port: int = 0
    _supervisor: ProcessSupervisor | None = field(default=None, init=False, repr=False)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "logs" / "milvus-stdout.log"

    def start(self) -> MilvusServer:
        try:
            from milvus import MilvusServerConfig, _initialize_data_files
        except ImportError as exc:
            raise MilvusLaunchError(
                "the Milvus server package is not installed: pip install milvus==2.3.5 "
                "(in the dev extra)"
            ) from exc
        self.data_dir = self.data_dir.resolve()
        if self.process is None and not self.port:
            self._auto_port = True
        self.port = self.port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        config = self._resolved_config(MilvusServerConfig)
        self._pin_embedded_etcd(int(config.get("etcd_port")))
        _initialize_data_files(str(self.data_dir))  # unpacks the binary and its libraries
        bin_dir = self.data_dir / "bin"
        env = dict(os.environ)
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.metrics_port),
            MILVUS_RUN_DIR=str(self.data_dir / "run"),
            LD_LIBRARY_PATH=os.pathsep.join(
                p for p in (str(bin_dir), env.get("LD_LIBRARY_PATH")) if p
            ),
        )
        self._supervisor = ProcessSupervisor(
            "milvus",
            [str(bin_dir / "milvus"), "run", "standalone"],
            self.log_path,
            env=env,
            cwd=self.data_dir,
        )
        healthz = f"http://127.0.0.1:{self.metrics_port}/healthz"
        self._supervisor.start(
            lambda: http_ok(healthz, expect=b"OK"),
            self.startup_timeout_s,
            interval_s=0.2,
            error=MilvusLaunchError,
            summary=self.log_tail,
        )
        return self

    def _resolved_config(self, config_class: type) -> Any:
        """The package's config, resolved (written under data_dir). Resolving test-binds the
        ports, and after a stop the old proxy port stays in TIME_WAIT for up to a minute: an
        automatically chosen port is then replaced by a fresh one (the new `uri` says which);
        a port the caller chose is retried for a while."""
        deadline = time.monotonic() + 30
        while True:
            config = _reuse_addr(config_class)(data_dir=str(self.data_dir), proxy_port=self.port)
            for key in list(config.configurable_items):
                if key.endswith("_port") and key != "proxy_port":
                    config.update(**{key: free_port()})
            for component in _COMPONENTS:
                config.set(f"{component}.ip", "127.0.0.1")
            # The default waits up to 30 min for in-flight work on SIGTERM; tests need seconds.
            config.set("common.gracefulStopTimeout", 5)
            # A restart waits for the previous run's etcd sessions to expire (default 30 s).
            config.set("common.session.ttl", 10)
            try:
                config.resolve()  # writes configs/milvus.yaml under data_dir
                return config
            except RuntimeError as exc:
                if "bind failed" not in str(exc) or time.monotonic() > deadline:
                    raise MilvusLaunchError(f"Milvus ports: {exc}") from None
                if getattr(self, "_auto_port", False):
                    self.port = free_port()
                else:
                    time.sleep(0.5)

    def _pin_embedded_etcd(self, client_port: int) -> None:
        """Embedded etcd otherwise listens on the fixed 2379/2380: two servers would clash."""
        peer = f"http://127.0.0.1:{free_port()}"
        client = f"http://127.0.0.1:{client_port}"
        etcd = self.data_dir / "configs" / "etcd.yaml"
        etcd.write_text(
            f"name: icl\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: icl={peer}\n"
        )
        milvus_yaml = self.data_dir / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text()
        head = "\netcd:\n"
        assert head in text, "unexpected milvus.yaml template"
        milvus_yaml.write_text(text.replace(head, f"{head}  config:\n    path: {etcd}\n", 1))

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) + f" (full log: {self.log_path})"

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (flushes and closes etcd cleanly), SIGKILL after timeout_s; a no-op once
        the server is gone."""
        if self._supervisor is not None:
            self._supervisor.stop(timeout_s)

    def __enter__(self) -> MilvusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
