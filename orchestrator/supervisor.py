"""One supervisor for the server processes this project launches (tritonserver, Milvus).

A `ProcessSupervisor` starts a command in its own process group, with its output appended to
a log file, and (on Linux) with PR_SET_PDEATHSIG so the server gets SIGTERM when the
launching thread dies, even by SIGKILL. It polls a readiness callable under a deadline and,
when the start fails, says why with the log's tail. It stops the group with SIGTERM, then
SIGKILL after a timeout, kills what is left of the group and runs the exit callbacks (e.g.
removing shared-memory regions).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A supervised server exited or was not ready in time; the message has its log's tail."""


def _prctl() -> Callable[..., int] | None:
    """libc's prctl, resolved in the parent: the child between fork and exec must not load
    libraries (another thread may hold the loader's lock at fork time)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn: the child gets SIGTERM when the launching thread dies (Linux).

    PDEATHSIG follows the thread that forked, not the process: start servers from a
    long-lived thread (the main thread), not from a short-lived worker.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: act as if it had after
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def http_ok(url: str, expect: bytes | None = None, timeout_s: float = 1.0) -> bool:
    """True when GET url answers 200 (and its body holds `expect`); False on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200 and (expect is None or expect in response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _default_error(message: str) -> Exception:
    return ServerStartError(message)


class ProcessSupervisor:
    """Supervises one run of `command`; start() again after stop() for another run."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        on_exit: Sequence[Callable[[int], None]] = (),
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._on_exit = list(on_exit)
        self.process: subprocess.Popen[bytes] | None = None
        self._returncode: int | None = None

    # -- state ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The last run's exit status (negative: killed by that signal); None while running."""
        return self.process.returncode if self.process is not None else self._returncode

    # -- start ---------------------------------------------------------------------------
    def start(
        self,
        ready: Callable[[], bool] | None = None,
        timeout_s: float = 120.0,
        *,
        interval_s: float = 0.1,
        error: Callable[[str], Exception] = _default_error,
        summary: Callable[[], str] | None = None,
        context: str = "",
    ) -> None:
        """Launch, then poll `ready()` until it says True. If the child exits first or the
        deadline passes, stop it and raise error(message): `context` (e.g. "while loading
        X") and `summary()` (default: the log's tail) say why."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._returncode = None
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group: a stop reaches its children
                preexec_fn=_die_with_parent_hook(),
            )
        log.info("%s started (pid %d), log %s", self.name, self.process.pid, self.log_path)
        if ready is None:
            return
        try:
            self._wait_ready(ready, timeout_s, interval_s, error, summary or self.log_tail, context)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(
        self,
        ready: Callable[[], bool],
        timeout_s: float,
        interval_s: float,
        error: Callable[[str], Exception],
        summary: Callable[[], str],
        context: str,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        where = f" {context}" if context else ""
        while True:
            if not self.running:
                raise error(f"{self.name} exited with code {self.returncode}{where}: {summary()}")
            if ready():
                return
            if time.monotonic() >= deadline:
                raise error(f"{self.name} not ready after {timeout_s:.0f}s{where}: {summary()}")
            time.sleep(interval_s)

    # -- stop ----------------------------------------------------------------------------
    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after timeout_s, then kill what is left of the
        group and run the exit callbacks. A no-op when it never started or was stopped."""
        proc, self.process = self.process, None
        if proc is None:
            return self._returncode
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs: SIGKILL", self.name, timeout_s)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Children share the group: make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._returncode = proc.returncode
        for callback in self._on_exit:
            try:
                callback(proc.returncode)
            except Exception:
                log.exception("%s exit callback failed", self.name)
        return self._returncode

    # -- log -----------------------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        """The last non-empty log lines on one line, and where the full log is."""
        text = [ln.strip() for ln in self.log_text().splitlines() if ln.strip()]
        return " | ".join(text[-lines:] or ["(empty log)"]) + f" (full log: {self.log_path})"
