"""The `icl` command as a user runs it: real processes, real output, one-line errors."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from icl.orchestrator.tritonserver import free_port
from icl.synthetic.demo_gallery import demo_gallery
from icl_api import pb, pb_grpc
from tests.helpers import enroll_all, gallery_images, wait_until


def icl(
    *args: str, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "icl.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def address(orchestrator) -> str:
    with orchestrator.channel() as channel:
        results = enroll_all(
            pb_grpc.PersonSearchStub(channel), gallery_images(demo_gallery(9, seed=8))
        )
    assert all(r.status == pb.EnrollResult.ACCEPTED for r in results)
    return orchestrator.address


def test_search_prints_a_ranked_table(address):
    out = icl("search", "--address", address, "--text", "a woman in a red top", "-k", "4")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip().startswith("│")]
    assert len(rows) == 4
    assert rows[0].split("│")[1].strip() == "1"
    assert "cam-" in out.stdout


def test_search_with_filters(address):
    out = icl(
        "search",
        "--address",
        address,
        "--text",
        "a man",
        "--camera",
        "cam-01",
        "--camera",
        "cam-02",
        "--since",
        "2026-01-05T08:00",
        "--until",
        "2026-01-06",
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--text", ""], "INVALID_ARGUMENT: text is empty"),
        (["--text", "a man", "-k", "0"], "INVALID_ARGUMENT: top_k"),
        (["--text", "a man", "--camera", "cam-77"], "NOT_FOUND"),
        (["--text", "a man", "--since", "yesterday"], "not an ISO-8601 time"),
    ],
)
def test_bad_search_is_one_line(address, args, words):
    out = icl("search", "--address", address, *args)
    assert out.returncode == 2
    assert words in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_unreachable_service_is_one_line():
    out = icl(
        "search", "--address", f"127.0.0.1:{free_port()}", "--text", "a man", "--timeout", "2"
    )
    assert out.returncode == 2
    assert "UNAVAILABLE" in out.stderr or "DEADLINE_EXCEEDED" in out.stderr
    assert "Traceback" not in out.stderr


def test_demo_check_runs_the_whole_stack(tmp_path):
    """`icl demo --check`: export, tritonserver, orchestrator, Enroll, Search, clean stop."""
    out = icl("demo", "--check", "--images", "45", "--workdir", str(tmp_path / "w"), timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "enrolled 45 of 45 demo images" in out.stdout
    assert out.stdout.count("Search: ") == 3
    ps = subprocess.run(["pgrep", "-f", str(tmp_path / "w")], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "demo left processes running"


def test_demo_serves_with_the_console_and_stops_on_ctrl_c(tmp_path):
    """`icl demo` as the README runs it: the service and the operator console come up (the
    console's page answers), and Ctrl-C stops everything."""
    workdir = tmp_path / "w"
    proc = subprocess.Popen(
        [sys.executable, "-m", "icl.cli", "demo", "--images", "9", "--workdir", str(workdir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 240
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"operator console: (http://127\.0\.0\.1:\d+)", line)
            url = match.group(1) if match else None
        assert url, "".join(lines)

        def page_up() -> bool:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    return reply.status == 200
            except OSError:
                return False

        assert wait_until(page_up, 60), (workdir / "console.log").read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(lines) + proc.stdout.read()
        assert not page_up()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    ps = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "demo left processes running"


def test_serve_fails_clearly_without_triton(tmp_path):
    out = icl(
        "serve",
        "--triton-url",
        f"127.0.0.1:{free_port()}",
        "--milvus-uri",
        str(tmp_path / "g.db"),
        "--port",
        "0",
        "--triton-wait",
        "3",
        timeout=60,
    )
    assert out.returncode == 2
    assert "did not serve text_encoder" in out.stderr
    assert "Traceback" not in out.stderr
