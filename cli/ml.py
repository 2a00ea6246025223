"""The ML commands of `icl`: synth, train, eval, convert, train-mllm."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.table import Table

from icl.cli.common import console, fail


def synth(
    out: Annotated[Path, typer.Option(help="Dataset directory to write.")],
    ids: Annotated[int, typer.Option(min=10, help="Number of identities.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same bytes.")] = 0,
    difficulty: Annotated[str, typer.Option(help="easy | medium | hard.")] = "medium",
) -> None:
    """Write a synthetic pedestrian dataset in the CUHK-PEDES format (reid_raw.json + imgs/)."""
    from icl.synthetic.dataset import write_synthetic_dataset

    started = time.perf_counter()
    try:
        summary = write_synthetic_dataset(out, ids, seed, difficulty, progress=True)
    except ValueError as exc:
        raise fail(str(exc)) from None
    per_split = ", ".join(
        f"{name} {summary.ids[name]} ids / {summary.images[name]} images" for name in summary.ids
    )
    console.print(
        f"wrote {out} ({difficulty}, seed {seed}): {per_split}; "
        f"{sum(summary.captions.values())} captions in {time.perf_counter() - started:.1f} s",
        highlight=False,
    )


def _read(data: Path, fmt: str | None) -> Any:
    from icl.data.readers import DatasetError, read_dataset

    try:
        return read_dataset(data, fmt)
    except DatasetError as exc:
        raise fail(str(exc)) from None


def train(
    data: Annotated[Path, typer.Option(help="Dataset root (any of the four benchmark formats).")],
    config: Annotated[Path, typer.Option(help="Run config (TOML with [model] and [train]).")],
    out: Annotated[Path, typer.Option(help="Run directory (checkpoints, history).")],
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out (same config).")
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Start from this checkpoint's weights (best.pt or last.pt; matching names and "
            "shapes): a warm start whose trainable set may differ.",
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads (default: the config's, else cores).")
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Dataset format.")] = None,
) -> None:
    """Train a dual encoder; the checkpoint is selected on the val split, never on test."""
    from icl.data.readers import DatasetError, carve_val_split
    from icl.models.pretrained import PretrainedWeightsError, tokenizer_for
    from icl.training.config import ConfigError, load_run_config
    from icl.training.trainer import train as run_training

    try:
        run = load_run_config(config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if threads is not None:
        run = run.model_copy(update={"train": run.train.model_copy(update={"threads": threads})})
    dataset = _read(data, fmt)
    if "val" not in dataset.splits():
        try:
            dataset = carve_val_split(dataset, run.train.val_fraction, run.train.seed)
        except DatasetError as exc:
            raise fail(str(exc)) from None
        console.print(f"no val split: carved {run.train.val_fraction:.0%} of train identities")
    console.print(dataset.summary(), highlight=False)
    try:
        result = run_training(
            run,
            dataset.split("train"),
            dataset.split("val"),
            out,
            tokenizer_for(run.model),
            resume=resume,
            init_from=init_from,
            data_note=f"{dataset.format} {data}",
        )
    except (FileExistsError, ValueError, PretrainedWeightsError) as exc:
        raise fail(str(exc)) from None
    val = result.best_val
    console.print(
        f"best epoch {result.best_epoch}: val R1 {val['r1']:.2f} mAP {val['map']:.2f}; "
        f"{result.seconds / 60:.1f} min of training; checkpoint {out / 'best.pt'}",
        highlight=False,
    )


def machine_facts() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )


def eval_(
    data: Annotated[Path, typer.Option(help="Dataset root.")],
    checkpoint: Annotated[Path, typer.Option(help="Dual-encoder checkpoint (icl format).")],
    split: Annotated[str, typer.Option(help="Split to evaluate.")] = "test",
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the metrics here.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="Dataset format.")] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads (default: cores).")
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Frozen towers: read/write their features in the feature cache.",
        ),
    ] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Feature cache folder (default: ICL_CACHE_DIR or ~/.cache/icl)."),
    ] = None,
    thi: Annotated[
        bool, typer.Option("--thi", help="Also run THI: tune xi/threshold on val, report here.")
    ] = False,
    mllm: Annotated[
        Path | None, typer.Option(help="Demo MLLM weights for --thi (default: the committed).")
    ] = None,
    candidates: Annotated[int, typer.Option(min=1, max=50, help="THI's K.")] = 5,
    lam: Annotated[float, typer.Option(min=0.0, max=1.0, help="THI's lambda.")] = 0.8,
    xi: Annotated[
        float | None, typer.Option(help="THI: fix xi (with --yes-threshold) instead of tuning.")
    ] = None,
    yes_threshold: Annotated[
        float | None, typer.Option(min=0.0, max=1.0, help="THI: fix the Yes threshold.")
    ] = None,
) -> None:
    """Rank every caption of a split against its images; print R1/R5/R10/mAP/mINP/rSum."""
    import torch

    from icl.data.readers import DatasetError
    from icl.evaluation import evaluate, retrieval_set
    from icl.images import ImageRejected
    from icl.models.dual_encoder import CheckpointError, load_checkpoint
    from icl.models.pretrained import tokenizer_for
    from icl.training.cache import FeatureCache, default_cache_dir
    from icl.training.progress import Progress
    from icl.training.trainer import machine_threads

    torch.set_num_threads(threads or machine_threads())
    if not checkpoint.is_file():
        raise fail(f"checkpoint {checkpoint} does not exist")
    try:
        model = load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc)) from None
    dataset = _read(data, fmt)
    features = FeatureCache(cache_dir or default_cache_dir()) if cache else None
    with Progress() as bars:
        try:
            records = dataset.split(split)
            started = time.perf_counter()
            loading = bars.task(f"loading {split} images", total=len(records))
            data_set = retrieval_set(records, model.config.image_size, loading.advance)
        except (DatasetError, ImageRejected) as exc:
            raise fail(str(exc)) from None
        embedding = bars.task(
            "embedding captions + images", total=len(data_set.query_texts) + len(records)
        )
        metrics = evaluate(
            model, data_set, tokenizer_for(model.config), features, embedding.advance
        )
    seconds = time.perf_counter() - started
    table = Table(
        title=f"{dataset.format} {split}: {metrics.queries} queries x {len(records)} images",
        title_justify="left",
    )
    for column in ("R1", "R5", "R10", "mAP", "mINP", "rSum"):
        table.add_column(column, justify="right")
    table.add_row(
        *(
            f"{v:.2f}"
            for v in (metrics.r1, metrics.r5, metrics.r10, metrics.map, metrics.minp, metrics.rsum)
        )
    )
    console.print(table)
    if metrics.queries_without_positive:
        console.print(
            f"{metrics.queries_without_positive} queries had no positive and are left out"
        )
    if (xi is None) != (yes_threshold is None):
        raise fail("--xi and --yes-threshold go together (both fixed, or both tuned on val)")
    fixed = (xi, yes_threshold) if xi is not None and yes_threshold is not None else None
    thi_result = _thi(model, dataset, split, mllm, candidates, lam, fixed) if thi else None
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            **({"thi": thi_result} if thi_result else {}),
            "dataset": dataset.format,
            "data": str(data),
            "split": split,
            "checkpoint": str(checkpoint),
            "metrics": metrics.as_dict(),
            "seconds": round(seconds, 2),
            "machine": machine_facts(),
        }
        json_out.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"metrics written to {json_out}")


def convert(
    source: Annotated[Path, typer.Argument(help="OpenAI CLIP ViT-B/16, RDE/ICL or IRRA file.")],
    out: Annotated[Path, typer.Option(help="icl checkpoint to write.")],
    context_length: Annotated[
        int | None,
        typer.Option(help="Text length (77; 168 for UFine6926). Default: the checkpoint's."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Run config whose [model] the weights fit (default: ViT-B/16)."),
    ] = None,
    half: Annotated[bool, typer.Option("--half", help="Store weights as fp16.")] = False,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle", help="Allow a full unpickle (only for files from a trusted source)."
        ),
    ] = False,
) -> None:
    """Convert a released checkpoint into an icl dual-encoder checkpoint, with a key report."""
    from icl.models.config import vit_b16_config
    from icl.models.convert import ConversionError, convert_to_file
    from icl.training.config import ConfigError, load_run_config

    if not source.is_file():
        raise fail(f"{source} does not exist")
    cfg = vit_b16_config(context_length) if context_length else None
    if config is not None:
        try:
            cfg = load_run_config(config).model
        except ConfigError as exc:
            raise fail(str(exc)) from None
    try:
        report = convert_to_file(source, out, cfg, half=half, trust_pickle=trust_pickle)
    except ConversionError as exc:
        raise fail(str(exc)) from None
    console.print(report.summary(), highlight=False)
    console.print(f"checkpoint written to {out}")


def _metric_cells(m: dict) -> list[str]:
    return [f"{m[k]:.2f}" for k in ("r1", "r5", "r10", "map", "minp")]


def _thi(
    model: Any,
    dataset: Any,
    split: str,
    mllm: Path | None,
    candidates: int,
    lam: float,
    fixed: tuple[float, float] | None = None,
) -> dict:
    from icl.mllm.demo import load_demo_backend, load_demo_mllm
    from icl.thi.engine import ThiParams
    from icl.thi.report import evaluate_thi

    if split == "val":
        raise fail("--thi tunes on val: evaluate another split (e.g. --split test)")
    backend = load_demo_mllm(mllm) if mllm else load_demo_backend()
    params = ThiParams(candidates=candidates, lam=lam)
    if fixed is not None:
        params = ThiParams(candidates=candidates, lam=lam, xi=fixed[0], yes_threshold=fixed[1])
    what = "fixed xi/threshold" if fixed else "tuning on val"
    with console.status(f"THI: scoring candidates, {what}, replaying on " + split):
        result = evaluate_thi(
            model, dataset, backend, split, "val", params, fixed=fixed is not None
        )
    limits = result["tuning_limits"]
    how = (
        "fixed by --xi/--yes-threshold (not tuned)"
        if fixed is not None
        else f"best R1 + mAP on val with R5 at most {limits['max_r5_drop']:g} below base and "
        f"at most {limits['max_cost_ratio']:g}x the paper's MLLM evaluations"
        if result["tuned_within_limits"]
        else "no setting met the R5/cost limits on val: best R1 + mAP there"
    )
    table = Table(title=f"THI on {split}; xi and threshold: {how}", title_justify="left")
    for column in ("row", "R1", "R5", "R10", "mAP", "mINP", "anchor rate", "anchor precision"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row in result["rows"]:
        table.add_row(
            row["name"],
            *_metric_cells(row["metrics"]),
            f"{100 * row['anchor_rate']:.1f}%",
            f"{100 * row['anchor_precision']:.1f}%",
        )
    console.print(table)
    rounds = Table(title="mAP / R1 per round (round r: candidates 1..r)", title_justify="left")
    rounds.add_column("row")
    tuned = result["rows"][1]
    for r in range(len(tuned["rounds"])):
        rounds.add_column(f"round {r}", justify="right")
    for row in result["rows"][1:]:
        rounds.add_row(row["name"], *(f"{m['map']:.2f} / {m['r1']:.2f}" for m in row["rounds"]))
    console.print(rounds)
    costs = Table(title="MLLM cost per query", title_justify="left")
    for column in ("schedule", "evaluations", "vs reference", "round trips"):
        costs.add_column(column, justify="left" if column == "schedule" else "right")
    reference = result["costs"]["reference (paper's schedule)"]["evaluations_per_query"]
    for name, cost in result["costs"].items():
        costs.add_row(
            name,
            f"{cost['evaluations_per_query']:.2f}",
            f"{cost['evaluations_per_query'] / reference:.2f}x",
            f"{cost['round_trips_per_query']:.2f}",
        )
    console.print(costs)
    share = result["fits_caption_other_identity_share"]
    console.print(
        f"verifier accuracy on top-{candidates} candidates: "
        f"{100 * result['verifier_accuracy_top_k']:.1f}%; "
        + (
            f"candidates that fit the caption but are another identity: {100 * share:.1f}%; "
            if share is not None
            else ""
        )
        + f"MLLM {result['mllm']}",
        highlight=False,
    )
    return result


def train_mllm(
    data: Annotated[Path, typer.Option(help="A synthetic dataset written by `icl synth`.")],
    out: Annotated[Path, typer.Option(help="Weights file to write.")],
    # The defaults are the committed demo MLLM's (icl/demo/mllm.pt).
    image_epochs: Annotated[int, typer.Option(min=1)] = 40,
    parser_captions: Annotated[int, typer.Option(min=100)] = 20000,
    parser_epochs: Annotated[int, typer.Option(min=1)] = 3,
) -> None:
    """Train the demo MLLM (attribute VQA net + caption parser) on the synthetic world."""
    from icl.data.readers import DatasetError
    from icl.mllm.demo import save_demo_mllm
    from icl.mllm.demo_training import train_demo_mllm

    if not (data / "attributes.json").is_file():
        raise fail(f"{data} has no attributes.json: train-mllm needs a dataset from `icl synth`")
    try:
        model, report = train_demo_mllm(
            data, image_epochs, parser_captions, parser_epochs, lambda s: console.print(s)
        )
    except DatasetError as exc:
        raise fail(str(exc)) from None
    save_demo_mllm(model, out, extra=report)
    console.print(
        f"val pair accuracy {100 * report['val_pair_accuracy']:.1f}%, mean test attribute "
        f"accuracy {100 * np.mean(list(report['test_attribute_accuracy'].values())):.1f}%; "
        f"{report['seconds'] / 60:.1f} min; weights written to {out}",
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command()(synth)
    app.command()(train)
    app.command("eval")(eval_)
    app.command()(convert)
    app.command("train-mllm")(train_mllm)
