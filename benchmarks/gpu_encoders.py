"""CUDA execution of the encoders: fp32/fp16 parity with the CPU fp32 model, and throughput.

Run on a machine with an NVIDIA GPU (torch with CUDA):

    python benchmarks/gpu_encoders.py --out docs/benchmarks/gpu_encoders

It builds the full ICL configuration (CLIP ViT-B/16 at 384x128 + CLIP text transformer,
BGE 512 + TSE 1024) and the demo configuration, checks that the CUDA fp32 and fp16 served
embeddings match the CPU fp32 model (cosine), measures image-encoder throughput at several
batch sizes and text-encoder latency, and compares the achieved FLOP rate with the GPU's
measured dense matmul peak in the same run. Weights are random (timings and numerics do
not depend on their values; the converters load released checkpoints into the same model).
Writes `results.json` and `results.md` into --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from icl.models.config import ModelConfig, vit_b16_config
from icl.models.dual_encoder import build_model
from icl.text.tokenizer import ClipTokenizer
from icl.training.config import load_run_config

CAPTIONS = [
    "A woman in a red coat carrying a black backpack, with long brown hair.",
    "The man wears a white short-sleeved shirt, blue jeans and black sneakers.",
    "A young person with a grey hoodie, black trousers and a blue cap, holding a phone.",
    "She has a yellow dress, white shoes and a brown handbag on her shoulder.",
]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeats` runs (after `warmup`)."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul rate (FLOP/s) of an n x n x n product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time(lambda: a @ b, repeats=10)
    return 2 * n**3 / seconds


def flops_per_call(module: torch.nn.Module, example: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(example)
    return int(counter.get_total_flops())


def cosine_min(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def bench_model(name: str, cfg: ModelConfig, device: str, batches: list[int]) -> dict:
    torch.manual_seed(0)
    model = build_model(cfg, seed=0)
    h, w = cfg.image_size
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (16, h, w, 3), dtype=torch.uint8, generator=gen)
    ids = torch.from_numpy(ClipTokenizer(cfg.context_length)(CAPTIONS * 4))
    with torch.no_grad():
        ref_img, ref_txt = model.image(pixels), model.text(ids)
    result: dict = {"model": name, "output_dim": cfg.output_dim, "image_size": [h, w]}
    result["image_gflop_per_image"] = flops_per_call(model.image, pixels[:1]) / 1e9
    result["text_gflop_per_query"] = flops_per_call(model.text, ids[:1]) / 1e9
    rows = []
    for dtype in (torch.float32, torch.float16):
        if device == "cpu" and dtype == torch.float16:
            continue
        m = build_model(cfg, seed=0).to(device=device, dtype=dtype).eval()
        with torch.inference_mode():
            img = m.image(pixels.to(device))
            txt = m.text(ids.to(device))
        parity = {
            "image_min_cosine": cosine_min(img, ref_img),
            "text_min_cosine": cosine_min(txt, ref_txt),
        }
        for batch in batches:
            x = torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device)
            with torch.inference_mode():
                seconds = _time(lambda m=m, x=x: m.image(x), repeats=10 if batch < 128 else 5)
            rows.append(
                {
                    "dtype": str(dtype).replace("torch.", ""),
                    "tower": "image",
                    "batch": batch,
                    "ms": seconds * 1000,
                    "items_per_s": batch / seconds,
                    "tflop_per_s": result["image_gflop_per_image"] * batch / seconds / 1000,
                    **parity,
                }
            )
        for batch in (1, 256):
            x = ids[:1].repeat(batch, 1).to(device)
            with torch.inference_mode():
                seconds = _time(lambda m=m, x=x: m.text(x), repeats=10)
            rows.append(
                {
                    "dtype": str(dtype).replace("torch.", ""),
                    "tower": "text",
                    "batch": batch,
                    "ms": seconds * 1000,
                    "items_per_s": batch / seconds,
                    "tflop_per_s": result["text_gflop_per_query"] * batch / seconds / 1000,
                    **parity,
                }
            )
    result["rows"] = rows
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu_encoders"))
    parser.add_argument("--batches", default="1,8,32,128,256")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the parity rows
    facts = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    n = 8192 if device == "cuda" else 1024
    facts["matmul_peak_tflop_per_s"] = {
        "fp32": matmul_peak(device, torch.float32, n) / 1e12,
        **({"fp16": matmul_peak(device, torch.float16, n) / 1e12} if device == "cuda" else {}),
    }
    demo = load_run_config(Path(__file__).resolve().parents[1] / "icl/demo/dual_encoder.toml")
    results = [
        bench_model("ViT-B/16 384x128 (ICL)", vit_b16_config(), device, batches),
        bench_model("demo (CNN + conv1d)", demo.model, device, batches),
    ]
    lines = [
        f"Device: {facts['device']}; torch {facts['torch']}, CUDA {facts['cuda']}; "
        f"measured matmul peak "
        + ", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in facts["matmul_peak_tflop_per_s"].items()),
        "",
        "| model | dtype | tower | batch | ms/batch | items/s | TFLOP/s | % of matmul peak "
        "| min cos vs CPU fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for r in res["rows"]:
            short = {"float32": "fp32", "float16": "fp16"}[r["dtype"]]
            peak = facts["matmul_peak_tflop_per_s"].get(short, float("nan"))
            cos = r["image_min_cosine"] if r["tower"] == "image" else r["text_min_cosine"]
            lines.append(
                f"| {res['model']} | {r['dtype']} | {r['tower']} | {r['batch']} | {r['ms']:.2f} "
                f"| {r['items_per_s']:.0f} | {r['tflop_per_s']:.2f} "
                f"| {100 * r['tflop_per_s'] / peak:.0f}% | {cos:.6f} |"
            )
    for res in results:
        lines.append(
            f"\n{res['model']}: {res['image_gflop_per_image']:.2f} GFLOP per image, "
            f"{res['text_gflop_per_query']:.3f} GFLOP per query, "
            f"served vector {res['output_dim']}-d."
        )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps({"facts": facts, "results": results}, indent=2)
    )
    (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
