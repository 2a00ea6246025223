"""Encoder forward cost on this CPU: torch eager vs onnxruntime, ViT-B/16 and demo configs.

    python benchmarks/cpu_encoders.py            # writes docs/benchmarks/cpu_encoders.md

For each configuration the model is exported with the project's exporter (which checks
parity), then both runtimes embed the same inputs with the same thread count: milliseconds
per image at batch 1, 8 and 32, and per query at batch 1. The fp32 matmul rate of this
machine is measured in the same run, and the ViT-B/16 image encoder's FLOP rate is stated
as a share of it. Weights are random: cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch.utils.flop_counter import FlopCounterMode

from icl.export.onnx_export import export_dual_encoder
from icl.models.config import ModelConfig, vit_b16_config
from icl.models.dual_encoder import build_model
from icl.onnx_encoders import onnx_session
from icl.text.tokenizer import ClipTokenizer
from icl.training.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]

QUERY = "A woman in a red coat carrying a black backpack, with long brown hair and white shoes."


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_peak(threads: int, n: int = 2048) -> dict[str, float]:
    """fp32 n^3 matmul FLOP/s through torch and through onnxruntime (MLAS): the machine's
    peak is the better of the two (torch's CPU build does not use every vector unit)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    rates = {"torch": 2 * n**3 / _median_seconds(lambda: a @ b, 5)}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "matmul",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
        session = onnx_session(path, threads)
        feed = {"a": a.numpy(), "b": b.numpy()}
        rates["onnxruntime"] = 2 * n**3 / _median_seconds(lambda: session.run(None, feed), 5)
    return rates


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench(name: str, cfg: ModelConfig, threads: int, repeats: int) -> list[dict]:
    torch.set_num_threads(threads)
    model = build_model(cfg, seed=0)
    h, w = cfg.image_size
    rng = np.random.default_rng(0)
    images = {b: rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8) for b in (1, 8, 32)}
    ids = ClipTokenizer(cfg.context_length)([QUERY])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.image(torch.from_numpy(images[1]))
    gflop_image = counter.get_total_flops() / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        text_onnx, image_onnx = Path(tmp) / "text.onnx", Path(tmp) / "image.onnx"
        export_dual_encoder(model, text_onnx, image_onnx)
        sessions = {
            "text": onnx_session(text_onnx, threads),
            "image": onnx_session(image_onnx, threads),
        }
        rows = []
        for runtime in ("torch eager", "onnxruntime"):
            cases = [("image", b, images[b]) for b in (1, 8, 32)] + [("query", 1, ids)]
            for what, batch, x in cases:
                if runtime == "torch eager":
                    module = model.image if what == "image" else model.text
                    tensor = torch.from_numpy(x)

                    def call(module=module, tensor=tensor):
                        with torch.inference_mode():
                            module(tensor)
                else:
                    session = sessions["image" if what == "image" else "text"]
                    feed = {"pixels" if what == "image" else "input_ids": x}

                    def call(session=session, feed=feed):
                        session.run(["embedding"], feed)

                n = repeats if batch == 1 else max(2, repeats // 4)
                seconds = _median_seconds(call, n)
                rows.append(
                    {
                        "model": name,
                        "runtime": runtime,
                        "what": what,
                        "batch": batch,
                        "ms_per_item": 1000 * seconds / batch,
                        "gflop_per_s": gflop_image * batch / seconds if what == "image" else None,
                    }
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/cpu_encoders.md")
    args = parser.parse_args()
    rates = matmul_peak(args.threads)
    peak = max(rates.values())
    demo = load_run_config(ROOT / "icl/demo/dual_encoder.toml").model
    rows = bench("demo (CNN + conv1d, 96x32)", demo, args.threads, args.repeats * 5)
    rows += bench("ViT-B/16 384x128 (ICL)", vit_b16_config(), args.threads, args.repeats)
    facts = (
        f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} thread(s); torch "
        f"{torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}; "
        "measured fp32 matmul (2048^3): "
        + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items())
        + f" GFLOP/s; peak = the better, {peak / 1e9:.0f} GFLOP/s"
    )
    lines = [
        f"Machine: {facts}",
        "",
        "| model | runtime | input | batch | ms per item | GFLOP/s | share of matmul peak |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        rate = r["gflop_per_s"]
        lines.append(
            f"| {r['model']} | {r['runtime']} | {r['what']} | {r['batch']} "
            f"| {r['ms_per_item']:.2f} | {'' if rate is None else f'{rate:.0f}'} "
            f"| {'' if rate is None else f'{100 * rate * 1e9 / peak:.0f}%'} |"
        )
    lines += ["", "Speed-up of onnxruntime over torch eager (same run, same threads):", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        for what, batch in (("image", 1), ("image", 8), ("image", 32), ("query", 1)):
            t, o = (
                next(
                    r["ms_per_item"]
                    for r in rows
                    if r["model"] == model
                    and r["runtime"] == rt
                    and r["what"] == what
                    and r["batch"] == batch
                )
                for rt in ("torch eager", "onnxruntime")
            )
            lines.append(f"- {model}, {what} batch {batch}: {t / o:.2f}x")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        "# Encoder forward cost on the project's CPU machine\n\n"
        "Written by `python benchmarks/cpu_encoders.py`; rerun to refresh.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
