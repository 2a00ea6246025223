"""benchmarks/triton_gpu.py (Triton+TensorRT throughput on a lent GPU) runs here too.

Real: the session's tritonserver (CPU repository; no GPU here), the script as a subprocess,
short cells. Checks that it reads the models from the server, measures every cell, and
writes the table and the JSON; the figures themselves mean GPU throughput only against the
GPU flavour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_gpu.py"


def test_benchmark_measures_every_cell_through_triton(triton, tmp_path: Path) -> None:
    out = tmp_path / "triton_gpu.md"
    cmd = [sys.executable, str(SCRIPT), "--url", triton.grpc_url, "--batches", "1,4"]
    cmd += ["--clients", "2", "--seconds", "0.5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["server"].startswith("triton 2.")
    assert data["platforms"]["image_encoder"] == "python"  # the CPU flavour here
    cells = [(r["model"], r["per_request"]) for r in data["rows"]]
    assert cells == [("image_encoder", 1), ("image_encoder", 4), ("text_encoder", 1)]
    assert all(r["items_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] > 0 for r in data["rows"])
    assert data["compute_ms_per_execution"]["image_encoder"] > 0
    assert "| image_encoder | 4 | 2 |" in out.read_text()
