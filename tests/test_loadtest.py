"""`locust -f loadtest/thi.py` run headless for a bounded time against a real service (the
session's tritonserver with the demo encoders and the demo `mllm`, Milvus Lite, `icl serve`)
holding a small demo gallery: every task of the mix made requests, none failed, the stats CSV
was written, and the crops the Enroll tasks stored were deleted at the end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl_api import pb_grpc
from icl_api.client import search_request
from tests.helpers import enroll_all, gallery_images, start_orchestrator

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtest" / "thi.py"
N_IMAGES = 30


@pytest.mark.unit
def test_queries_file_is_current() -> None:
    lines = (ROOT / "loadtest" / "queries.txt").read_text(encoding="utf-8").splitlines()
    assert [q for q in lines if not q.startswith("#")] == demo_queries(seed=0, count=100)


def _locust(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**os.environ, **env}
    )


def test_locust_headless_against_the_service(triton, tmp_path: Path) -> None:
    running = start_orchestrator(
        triton.grpc_url, tmp_path / "gallery.db", tmp_path / "serve.log", ICL_MLLM_MODEL="mllm"
    )
    try:
        with running.channel() as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            enroll_all(stub, gallery_images(demo_gallery(N_IMAGES)), batch_size=10)
            result = _locust(
                "--headless",
                "-u",
                "4",
                "-r",
                "4",
                "-t",
                "20s",
                "--csv",
                str(tmp_path / "run"),
                "--only-summary",
                # Every task of the mix gets a share in 20 s.
                "--icl-plain-weight",
                "3",
                "--icl-filtered-weight",
                "2",
                "--icl-thi-weight",
                "2",
                "--icl-stream-weight",
                "2",
                "--icl-enroll-weight",
                "2",
                # No --host: the address comes from the shared client settings.
                ICL_ADDRESS=running.address,
            )
            assert result.returncode == 0, result.stderr[-3000:]
            with open(tmp_path / "run_stats.csv", newline="") as f:
                rows = {row["Name"]: row for row in csv.DictReader(f)}
            names = ("Search [plain]", "Search [filtered]", "Search [thi]", "SearchStream [thi]")
            for name in (*names, "Enroll"):
                assert int(rows[name]["Request Count"]) > 0, (name, rows.keys())
            assert int(rows["Aggregated"]["Failure Count"]) == 0
            assert int(rows["Aggregated"]["Request Count"]) >= 20
            # The load test's crops are gone again: the whole gallery is the demo's.
            everything = stub.Search(search_request(demo_queries()[0], top_k=1000), timeout=30)
            assert len(everything.hits) == N_IMAGES
            assert not [h for h in everything.hits if h.camera_id == "loadtest"]
    finally:
        running.stop()


def test_bad_options_give_one_line(tmp_path: Path) -> None:
    result = _locust(
        "--headless", "-t", "2s", "--icl-queries", str(tmp_path / "missing.txt"), timeout=60
    )
    assert result.returncode != 0
    assert "--icl-queries: cannot read" in result.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    result = _locust("--headless", "-t", "2s", "--icl-queries", str(empty), timeout=60)
    assert result.returncode != 0
    assert "holds no queries" in result.stderr
    weights = ("--icl-plain-weight", "0", "--icl-filtered-weight", "0", "--icl-thi-weight", "0")
    result = _locust(
        "--headless",
        "-t",
        "2s",
        *weights,
        "--icl-stream-weight",
        "0",
        "--icl-enroll-weight",
        "0",
        timeout=60,
    )
    assert result.returncode != 0
    assert "task weights" in result.stderr
