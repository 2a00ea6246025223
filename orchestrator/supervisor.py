"""One supervisor for the server processes this project launches (tritonserver, Milvus).

A `ProcessSupervisor` starts a command in its own process group, with its output appended to
a log file, and (on Linux) with PR_SET_PDEATHSIG so the server gets SIGTERM when the
launching thread dies, even by SIGKILL. It polls a readiness callable under a deadline and,
when the start fails, says why with the log's tail. It stops the group with SIGTERM, then
SIGKILL after a timeout.

A watcher thread waits for the child's exit at all times, so an unexpected death is handled
at once, not at the next stop(): the rest of the process group (e.g. Triton's python-backend
stubs) is killed while the dead leader still holds the group's id, the child is reaped (no
zombie), and the exit callbacks run (e.g. removing shared-memory regions). `running` and
`returncode` then tell callers that the server died.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
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
        self._exited = threading.Event()
        self._exited.set()  # nothing runs yet
        self._stopping = False
        self._lock = threading.Lock()  # signals are sent only while the pid is still ours
        self._watcher: threading.Thread | None = None

    # -- state ---------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        """True from start() until the child exits (for whatever reason)."""
        return self.process is not None and not self._exited.is_set()

    @property
    def returncode(self) -> int | None:
        """The last run's exit status (negative: killed by that signal); None while running."""
        return self._returncode

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the child has exited and was cleaned up; its return code, or None."""
        self._exited.wait(timeout_s)
        return self._returncode

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
        self._stopping = False
        self._exited = threading.Event()
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
        self._watcher = threading.Thread(
            target=self._watch,
            args=(self.process,),
            name=f"{self.name}-watcher-{self.process.pid}",
            daemon=True,
        )
        self._watcher.start()
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
                self.wait()
                raise error(f"{self.name} exited with code {self._returncode}{where}: {summary()}")
            if ready():
                return
            if time.monotonic() >= deadline:
                raise error(f"{self.name} not ready after {timeout_s:.0f}s{where}: {summary()}")
            self._exited.wait(interval_s)  # wakes at once if the child dies

    # -- exit handling -------------------------------------------------------------------
    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        # Wait without reaping: until reaped, the dead leader's pid still names its process
        # group, so the killpg below cannot reach a reused pid. ChildProcessError: someone
        # else reaped it already (proc.poll() or proc.wait() on the Popen).
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        with self._lock:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the rest of the group (stubs etc.)
            code = proc.wait()
            self._returncode = code
        # INFO either way: callers learn of a death from running/returncode and say so.
        why = "stopped" if self._stopping else "exited on its own"
        log.info("%s (pid %d) %s, code %d", self.name, proc.pid, why, code)
        for callback in self._on_exit:
            try:
                callback(code)
            except Exception:  # a failing cleanup must not hide the exit from waiters
                log.exception("%s exit callback failed", self.name)
        self._exited.set()

    def _signal_group(self, sig: signal.Signals) -> None:
        with self._lock:
            if self.process is not None and self._returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, sig)

    # -- stop ----------------------------------------------------------------------------
    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after timeout_s; wait for the cleanup.
        A no-op (never raises) when the child has already exited or never started."""
        if self.process is None:
            return self._returncode
        self._stopping = True
        if not self._exited.is_set():
            self._signal_group(signal.SIGTERM)
            if not self._exited.wait(timeout_s):
                log.warning("%s did not stop in %.0fs: SIGKILL", self.name, timeout_s)
                self._signal_group(signal.SIGKILL)
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=30)  # bounded: a process stuck in the kernel must not hang us
        self.process = None
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


class SupervisedServer:
    """What a server launcher exposes about its supervised process (`_supervisor` is set by
    its start())."""

    _supervisor: ProcessSupervisor | None

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        """The server process, from start() until stop()."""
        return self._supervisor.process if self._supervisor is not None else None

    @property
    def running(self) -> bool:
        return self._supervisor is not None and self._supervisor.running

    @property
    def returncode(self) -> int | None:
        """How the last run ended (negative: killed by that signal); None while running."""
        return self._supervisor.returncode if self._supervisor is not None else None

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the server has exited and was cleaned up; its return code, or None."""
        return self._supervisor.wait(timeout_s) if self._supervisor is not None else None
