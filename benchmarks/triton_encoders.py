"""Encoders through Triton vs in-process: torch eager, onnxruntime, Triton gRPC (16 clients).

    python benchmarks/triton_encoders.py     # writes docs/benchmarks/triton_encoders.md

The demo model is exported with the project's exporter into a CPU-flavour repository and
served by the real tritonserver (orchestrator/tritonserver.py). In the same run, on the same
machine: image-encoder throughput at 1, 8 and 32 images per request and text-encoder
latency at one query per request, for torch eager and onnxruntime in this process (one
caller) and through Triton gRPC (tritonclient aio) with 16 concurrent clients and dynamic
batching, for a few Triton settings (the levers: instances, intra-op threads, queue delay).
The clients run on the same cores as the server, as a co-located orchestrator would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc.aio as triton

from icl.demo import DEMO_WEIGHTS, demo_path
from icl.export.repository import CpuServingSettings, write_repository
from icl.models.dual_encoder import load_checkpoint
from icl.onnx_encoders import onnx_session
from icl.orchestrator.tritonserver import TritonServer
from icl.text.tokenizer import ClipTokenizer

ROOT = Path(__file__).resolve().parents[1]
QUERY = "A woman in a red coat carrying a black backpack, with long brown hair and white shoes."
BATCHES = (1, 8, 32)
CLIENTS = 16


@dataclass(frozen=True)
class Row:
    runtime: str
    what: str
    batch: int
    items_per_s: float
    p50_ms: float


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _timed(fn, seconds: float) -> tuple[int, list[float]]:
    fn()
    fn()  # warm-up
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return len(times), times


def in_process(model, repo: Path, threads: int, seconds: float) -> list[Row]:
    """One caller; text includes tokenisation, since the served contract is raw text."""
    torch.set_num_threads(threads)
    h, w = model.config.image_size
    rng = np.random.default_rng(0)
    tokenizer = ClipTokenizer(model.config.context_length)
    image_s = onnx_session(repo / "image_encoder/1/model.onnx", threads)
    text_s = onnx_session(repo / "text_encoder/1/model.onnx", threads)
    images = {b: rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8) for b in BATCHES}

    def eager(what: str, batch: int) -> None:
        with torch.inference_mode():
            if what == "image":
                model.image(torch.from_numpy(images[batch]))
            else:
                model.text(torch.from_numpy(tokenizer([QUERY])))

    def ort(what: str, batch: int) -> None:
        if what == "image":
            image_s.run(["embedding"], {"pixels": images[batch]})
        else:
            text_s.run(["embedding"], {"input_ids": tokenizer([QUERY])})

    rows = []
    # One runtime at a time, with a pause: torch's OpenMP and onnxruntime's thread pools
    # spin after work and would slow the other runtime if interleaved.
    for runtime, fn in (("torch eager", eager), ("onnxruntime", ort)):
        time.sleep(1.0)
        for what, batch in [*(("image", b) for b in BATCHES), ("text", 1)]:
            n, times = _timed(lambda fn=fn, what=what, batch=batch: fn(what, batch), seconds)
            rows.append(Row(runtime, what, batch, n * batch / sum(times), 1e3 * np.median(times)))
    return rows


async def _clients(url: str, model: str, make_input, batch: int, seconds: float) -> Row:
    client = triton.InferenceServerClient(url)
    out = [triton.InferRequestedOutput("EMBEDDING")]
    latencies: list[float] = []

    async def worker(end: float) -> None:
        inp = make_input(batch)
        while time.perf_counter() < end:
            t = time.perf_counter()
            await client.infer(model, [inp], outputs=out)
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(CLIENTS)))
    latencies.clear()  # the first half second warms the batcher and the channel
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(CLIENTS)))
    elapsed = time.perf_counter() - start
    await client.close()
    return Row(
        "",
        "image" if model == "image_encoder" else "text",
        batch,
        len(latencies) * batch / elapsed,
        1e3 * float(np.median(latencies)),
    )


def through_triton(
    model, repo: Path, settings: CpuServingSettings, log: Path, seconds: float
) -> list[Row]:
    write_repository(model, repo, settings)
    h, w = model.config.image_size
    rng = np.random.default_rng(0)

    def pixels(b: int) -> triton.InferInput:
        inp = triton.InferInput("PIXELS", [b, h, w, 3], "UINT8")
        inp.set_data_from_numpy(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))
        return inp

    def text(b: int) -> triton.InferInput:
        inp = triton.InferInput("TEXT", [b, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[QUERY.encode()]] * b, dtype=np.object_))
        return inp

    label = (
        f"Triton, {CLIENTS} clients ({settings.instances} inst x {settings.intra_op_threads} "
        f"thr, delay {settings.max_queue_delay_us} us)"
    )
    with TritonServer(repo, log) as server:

        async def run() -> list[Row]:
            rows = [
                await _clients(server.grpc_url, "image_encoder", pixels, b, seconds)
                for b in BATCHES
            ]
            rows.append(await _clients(server.grpc_url, "text_encoder", text, 1, seconds))
            return rows

        rows = asyncio.run(run())
    return [Row(label, r.what, r.batch, r.items_per_s, r.p50_ms) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/triton_encoders.md")
    args = parser.parse_args()
    model = load_checkpoint(demo_path(DEMO_WEIGHTS))
    t = args.threads
    variants = [
        CpuServingSettings(instances=1, intra_op_threads=t, max_queue_delay_us=2000),
        CpuServingSettings(instances=2, intra_op_threads=1, max_queue_delay_us=2000),
        CpuServingSettings(instances=2, intra_op_threads=1, max_queue_delay_us=500),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        write_repository(model, repo)
        rows = in_process(model, repo, t, args.seconds)
        for i, s in enumerate(variants):
            rows += through_triton(model, repo, s, Path(tmp) / f"triton{i}.log", args.seconds)
    lines = [
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; in-process runtimes use {t} thread(s) "
        f"and one caller; torch {torch.__version__}, onnxruntime "
        f"{__import__('onnxruntime').__version__}; model: the demo dual encoder "
        f"(CNN 96x32 + conv1d text); {args.seconds:.0f} s per cell.",
        "",
        "| runtime | input | items per request | items/s | p50 ms per request |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.runtime} | {r.what} | {r.batch} | {r.items_per_s:.0f} | {r.p50_ms:.2f} |"
        for r in rows
    ]

    def rate(runtime: str, what: str, batch: int) -> float:
        return next(
            r.items_per_s
            for r in rows
            if r.runtime == runtime and (r.what, r.batch) == (what, batch)
        )

    lines += ["", "Ratios (same run):", ""]
    for what, batch in [*(("image", b) for b in BATCHES), ("text", 1)]:
        ort = rate("onnxruntime", what, batch)
        lines.append(
            f"- {what} x{batch}: onnxruntime / torch eager "
            f"{ort / rate('torch eager', what, batch):.2f}x (target >= 1.3x); "
            + "; ".join(
                f"{r.runtime.split('(')[1].rstrip(')')}: Triton / onnxruntime "
                f"{r.items_per_s / ort:.2f}"
                for r in rows
                if r.runtime.startswith("Triton") and (r.what, r.batch) == (what, batch)
            )
            + " (target >= 0.85)"
        )
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Encoders in-process vs through Triton (16 concurrent gRPC clients)\n\n"
        "Written by `python benchmarks/triton_encoders.py`; rerun to refresh.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
