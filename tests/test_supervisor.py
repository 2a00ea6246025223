"""The process supervisor on small real processes (sh, sleep): start, readiness, stop, log."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from icl.orchestrator.supervisor import ProcessSupervisor, ServerStartError


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


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
    assert pid is not None and len(_group_members(pid)) == 2
    began = time.monotonic()
    assert sup.stop(timeout_s=1) == -signal.SIGKILL
    assert 1 <= time.monotonic() - began < 10
    assert _group_members(pid) == [] and not _alive(pid)
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
    deadline = time.monotonic() + 10
    while sup.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sup.stop() == 0
    assert sup.log_tail(2) == f"b | c (full log: {sup.log_path})"
    assert sup.log_text().count("a") == 1
