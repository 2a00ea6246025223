"""`icl export`: a dual encoder -> ONNX (parity-checked) -> a Triton model repository."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from icl.cli.common import WORKDIR, console, fail


def load_model(checkpoint: Path | None) -> Any:
    from icl.demo import DEMO_WEIGHTS, demo_path
    from icl.models.dual_encoder import CheckpointError, load_checkpoint

    checkpoint = checkpoint or demo_path(DEMO_WEIGHTS)
    if not checkpoint.is_file():
        raise fail(f"checkpoint {checkpoint} does not exist")
    try:
        return load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise fail(str(exc)) from None


def export(
    out: Annotated[Path, typer.Option(help="Model repository to write.")] = WORKDIR
    / "model_repository",
    checkpoint: Annotated[
        Path | None, typer.Option(help="Dual-encoder checkpoint (default: the demo model).")
    ] = None,
    flavour: Annotated[
        str,
        typer.Option(help="cpu: python backend + onnxruntime; gpu: TensorRT plans + ensembles."),
    ] = "cpu",
    instances: Annotated[int, typer.Option(min=1, help="Triton instances per model.")] = 1,
    threads: Annotated[
        int, typer.Option(min=1, help="onnxruntime intra-op threads per instance (cpu).")
    ] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1)] = 64,
    max_queue_delay_us: Annotated[
        int | None, typer.Option(min=0, help="Dynamic batcher delay (default 2000 cpu, 500 gpu).")
    ] = None,
    precision: Annotated[str, typer.Option(help="gpu: fp16 or fp32 graph for TensorRT.")] = "fp16",
    plans: Annotated[
        str,
        typer.Option(
            help="gpu: auto (build when trtexec exists), require (fail without it), skip."
        ),
    ] = "auto",
) -> None:
    """Export a dual encoder to ONNX (parity-checked) and write a Triton model repository."""
    from icl.export.onnx_export import GraphContractError, ParityError
    from icl.export.repository import (
        CpuServingSettings,
        GpuServingSettings,
        write_gpu_repository,
        write_repository,
    )
    from icl.export.tensorrt import (
        BUILD_SCRIPT,
        PlanBuildError,
        TensorRTUnavailable,
        find_trtexec,
        require_trtexec,
        run_build_script,
    )

    if flavour not in ("cpu", "gpu"):
        raise fail(f"--flavour must be cpu or gpu, got {flavour!r}")
    if plans not in ("auto", "require", "skip"):
        raise fail(f"--plans must be auto, require or skip, got {plans!r}")
    try:
        if flavour == "gpu" and plans == "require":
            require_trtexec()  # before minutes of export, not after
        if flavour == "cpu":
            cpu = CpuServingSettings(
                max_batch_size=max_batch_size, instances=instances, intra_op_threads=threads
            )
            if max_queue_delay_us is not None:
                cpu = dataclasses.replace(cpu, max_queue_delay_us=max_queue_delay_us)
            reports = write_repository(load_model(checkpoint), out, cpu)
        else:
            gpu = GpuServingSettings(
                max_batch_size=max_batch_size,
                opt_batch_size=min(16, max_batch_size),
                instances=instances,
                precision=precision,  # type: ignore[arg-type]  # validated by GpuServingSettings
            )
            if max_queue_delay_us is not None:
                gpu = dataclasses.replace(gpu, max_queue_delay_us=max_queue_delay_us)
            reports = write_gpu_repository(load_model(checkpoint), out, gpu)
    except (ParityError, GraphContractError, TensorRTUnavailable, ValueError) as exc:
        raise fail(str(exc)) from None
    for r in reports:
        console.print(
            f"{r.tower} encoder ({r.precision}): min cosine vs torch fp32 {r.min_cosine:.7f}, "
            f"max |diff| {r.max_abs_diff:.1e}"
        )
    console.print(f"model repository written to {out}")
    if flavour == "gpu" and plans != "skip":
        if find_trtexec() is None:
            console.print(
                f"[yellow]TensorRT plans not built:[/] trtexec is not installed here. On the "
                f"serving GPU, inside the TensorRT image matching the Triton image, run "
                f"`sh {out / BUILD_SCRIPT}`; the repository is servable once each *_trt/1/ "
                "holds model.plan (docs/export.md)."
            )
            return
        try:
            with console.status("building TensorRT plans"):
                run_build_script(out)
        except PlanBuildError as exc:
            raise fail(str(exc)) from None
        console.print("TensorRT plans built")


def register(app: typer.Typer) -> None:
    app.command()(export)
