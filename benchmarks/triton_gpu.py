"""Encoder throughput through a running Triton: the GPU deployment's TensorRT plans.

Run against the compose stack's `triton` (docs/DEPLOY.md), from a machine that reaches its
gRPC port, once the plans are built:

    python benchmarks/triton_gpu.py --url HOST:8001 --out docs/benchmarks/triton_gpu.md

Measures the served `image_encoder` (crops per second at several crops per request, with
concurrent gRPC clients so the dynamic batcher forms the batches the plan's profile was
built for) and `text_encoder` (queries per second and p50 latency at one query per
request), reading the input size from the model's metadata; records the server's version
and each model's platform (ensemble over `*_trt` TensorRT plans on the GPU flavour), and
Triton's own per-model compute and queue time (statistics extension) over the run. Any
repository works (the CPU one too, which is how the project's tests run it); the figures
mean GPU throughput only against the GPU flavour.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc.aio as triton

QUERY = "A woman in a red coat carrying a black backpack, with long brown hair and white shoes."


@dataclass(frozen=True)
class Row:
    model: str
    per_request: int
    clients: int
    items_per_s: float
    p50_ms: float
    p95_ms: float


async def _load(client, model: str, make_input, batch: int, clients: int, seconds: float) -> Row:
    out = [triton.InferRequestedOutput("EMBEDDING")]
    latencies: list[float] = []

    async def worker(end: float) -> None:
        inp = make_input(batch)
        while time.perf_counter() < end:
            t = time.perf_counter()
            await client.infer(model, [inp], outputs=out)
            latencies.append(time.perf_counter() - t)

    await asyncio.gather(*(worker(time.perf_counter() + min(1.0, seconds)) for _ in range(clients)))
    latencies.clear()  # warm-up: channel, batcher, CUDA graphs / plan contexts
    start = time.perf_counter()
    await asyncio.gather(*(worker(start + seconds) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return Row(
        model,
        batch,
        clients,
        len(latencies) * batch / elapsed,
        1e3 * float(np.percentile(latencies, 50)),
        1e3 * float(np.percentile(latencies, 95)),
    )


async def measure(
    url: str, batches: list[int], clients: int, seconds: float
) -> tuple[dict[str, object], list[Row]]:
    client = triton.InferenceServerClient(url)
    try:
        server = await client.get_server_metadata(as_json=True)
        meta = await client.get_model_metadata("image_encoder", as_json=True)
        h, w, _ = (int(d) for d in meta["inputs"][0]["shape"][1:])
        platforms = {}
        for name in ("image_encoder", "text_encoder"):
            config = (await client.get_model_config(name, as_json=True))["config"]
            platforms[name] = config.get("platform") or config.get("backend", "")
            for step in config.get("ensemble_scheduling", {}).get("step", []):
                sub = (await client.get_model_config(step["model_name"], as_json=True))["config"]
                platforms[step["model_name"]] = sub.get("platform") or sub.get("backend", "")
        rng = np.random.default_rng(0)

        def pixels(b: int) -> triton.InferInput:
            inp = triton.InferInput("PIXELS", [b, h, w, 3], "UINT8")
            inp.set_data_from_numpy(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))
            return inp

        def text(b: int) -> triton.InferInput:
            inp = triton.InferInput("TEXT", [b, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[QUERY.encode()]] * b, dtype=np.object_))
            return inp

        before = await client.get_inference_statistics(as_json=True)
        rows = [await _load(client, "image_encoder", pixels, b, clients, seconds) for b in batches]
        rows.append(await _load(client, "text_encoder", text, 1, clients, seconds))
        after = await client.get_inference_statistics(as_json=True)
    finally:
        await client.close()
    info = {
        "server": f"{server['name']} {server['version']}",
        "image_size": [h, w],
        "platforms": platforms,
        "compute_ms_per_execution": _compute_ms(before, after),
    }
    return info, rows


def _compute_ms(before: dict, after: dict) -> dict[str, float]:
    """Triton's mean compute time per execution (batch) of each model over the run."""

    def by_name(stats: dict) -> dict[str, dict]:
        return {s["name"]: s for s in stats.get("model_stats", [])}

    out = {}
    b, a = by_name(before), by_name(after)
    for name, stats in a.items():
        runs = int(stats.get("execution_count", 0)) - int(b.get(name, {}).get("execution_count", 0))
        infer = stats["inference_stats"]["compute_infer"]
        ns = int(infer.get("ns", 0)) - int(
            b.get(name, {}).get("inference_stats", {}).get("compute_infer", {}).get("ns", 0)
        )
        if runs > 0:
            out[name] = round(ns / runs / 1e6, 3)
    return out


def render(info: dict[str, object], rows: list[Row], seconds: float) -> str:
    lines = [
        "# Encoders through Triton (benchmarks/triton_gpu.py)",
        "",
        f"Server: {info['server']}; models: "
        + ", ".join(f"{k} ({v})" for k, v in dict(info["platforms"]).items())  # type: ignore[call-overload]
        + f"; crops {info['image_size'][0]}x{info['image_size'][1]}; {seconds:g} s per cell.",  # type: ignore[index]
        "",
        "| model | items per request | clients | items/s | p50 ms | p95 ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.per_request} | {r.clients} | {r.items_per_s:.0f} | "
            f"{r.p50_ms:.2f} | {r.p95_ms:.2f} |"
        )
    lines += [
        "",
        "Triton's mean compute time per execution over the run (ms): "
        + ", ".join(f"{k} {v}" for k, v in dict(info["compute_ms_per_execution"]).items()),  # type: ignore[call-overload]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC address")
    parser.add_argument("--batches", default="1,8,32,64", help="crops per request")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=None, help="write the table (.md) and .json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    info, rows = asyncio.run(measure(args.url, batches, args.clients, args.seconds))
    text = render(info, rows, args.seconds)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({**info, "rows": [asdict(r) for r in rows]}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
