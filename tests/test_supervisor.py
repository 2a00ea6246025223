"""The process supervisor on small real processes (sh, sleep): start, readiness, stop, log."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from icl.orchestrator.supervisor import ProcessSupervisor, ServerStartError
from tests.helpers import group_members, proc_state, wait_until


def _sh(script: str, tmp_path: Path, **kwargs) -> ProcessSupervisor:
    return ProcessSupervisor("toy", ["sh", "-c", script], tmp_path / "logs" / "toy.log", **kwargs)


@pytest.mark.unit
def test_a_child_that_exits_while_starting_is_named_with_its_log(tmp_path):
    sup = _sh("echo loading; echo 'model x: failed to load' >&2; exit 3", tmp_path)
    began = time.monotonic()
    with pytest.raises(ServerStartError) as info:
        sup.start(lambda: False, timeout_s=30, context="while loading repo")
    assert time.monotonic() - began < 10
    message = str(info.value)
    assert "toy exited with code 3 while loading repo" in message
    assert "model x: failed to load" in message and str(sup.log_path) in message
    assert sup.returncode == 3 and not sup.running


@pytest.mark.unit
def test_not_ready_by_the_deadline_stops_the_child(tmp_path):
    class Refused(RuntimeError):
        pass

    sup = _sh("echo still warming up; exec sleep 60", tmp_path)
    with pytest.raises(Refused, match="toy not ready after 1s: still warming up"):
        sup.start(lambda: False, timeout_s=1, error=Refused)
    assert sup.process is None and sup.returncode == -signal.SIGTERM


@pytest.mark.unit
def test_ready_polls_until_true(tmp_path):
    flag = tmp_path / "ready"
    sup = _sh(f"sleep 0.5; touch {flag}; exec sleep 60", tmp_path)
    try:
        sup.start(flag.exists, timeout_s=30)
        assert sup.running and flag.exists()
    finally:
        sup.stop()
    assert not sup.running


@pytest.mark.unit
def test_stop_reaches_the_whole_group_and_escalates_to_sigkill(tmp_path):
    """The leader ignores SIGTERM, its background child does not: SIGKILL after the timeout,
    and no member of the group outlives stop()."""
    on_exit: list[int] = []
    sup = _sh("trap '' TERM; sleep 60 & echo started; wait", tmp_path, on_exit=[on_exit.append])
    sup.start(lambda: "started" in sup.log_text(), timeout_s=30)
    pid = sup.pid
    assert pid is not None and len(group_members(pid)) == 2
    began = time.monotonic()
    assert sup.stop(timeout_s=1) == -signal.SIGKILL
    assert 1 <= time.monotonic() - began < 10
    assert group_members(pid) == [] and proc_state(pid) is None
    assert on_exit == [-signal.SIGKILL]
    assert sup.stop() == -signal.SIGKILL and on_exit == [-signal.SIGKILL]  # a no-op
    assert sup.process is None


@pytest.mark.unit
def test_environment_and_working_directory(tmp_path):
    out = tmp_path / "out"
    sup = _sh(
        f'echo "$TOY_VALUE $(pwd)" > {out}; exec sleep 60',
        tmp_path,
        env={**os.environ, "TOY_VALUE": "42"},
        cwd=tmp_path,
    )
    try:
        sup.start(out.exists, timeout_s=30)
        time.sleep(0.1)
        assert out.read_text().split() == ["42", str(tmp_path)]
    finally:
        sup.stop()


@pytest.mark.unit
def test_log_tail_is_one_line(tmp_path):
    sup = _sh("printf 'a\\n\\nb\\nc\\n'", tmp_path)
    sup.start()
    assert sup.wait(10) == 0
    assert sup.stop() == 0
    assert sup.log_tail(2) == f"b | c (full log: {sup.log_path})"
    assert sup.log_text().count("a") == 1


@pytest.mark.unit
def test_a_child_that_dies_is_reaped_and_its_group_killed_at_once(tmp_path):
    """Regression: a SIGKILLed server stayed a zombie, and its children alive, until stop()
    or the launcher's exit. The watcher reaps it, kills the group, runs the exit callbacks."""
    on_exit: list[int] = []
    sup = _sh("sleep 60 & echo started; wait", tmp_path, on_exit=[on_exit.append])
    sup.start(lambda: "started" in sup.log_text(), timeout_s=30)
    pid = sup.pid
    assert pid is not None and len(group_members(pid)) == 2
    os.kill(pid, signal.SIGKILL)  # only the leader: its child stays in the group
    assert wait_until(lambda: not sup.running, 5)
    assert proc_state(pid) is None  # reaped: no zombie left
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert group_members(pid) == []
    assert sup.returncode == -signal.SIGKILL and on_exit == [-signal.SIGKILL]
    assert sup.stop() == -signal.SIGKILL and on_exit == [-signal.SIGKILL]  # a no-op


@pytest.mark.unit
def test_a_child_reaped_by_someone_else_is_still_noticed(tmp_path):
    sup = _sh("exec sleep 60", tmp_path)
    sup.start()
    assert sup.process is not None
    sup.process.kill()
    sup.process.wait()  # reaps it behind the supervisor's back
    assert sup.wait(5) == -signal.SIGKILL and not sup.running
    sup.stop()
