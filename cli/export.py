"""`icl export`: a dual encoder -> ONNX (parity-checked) -> a Triton model repository."""

from __future__ import annotations

import dataclasses
import json
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
    mllm: Annotated[
        str,
        typer.Option(
            help="THI's MLLM model `mllm`: none, demo (the demo model, python backend), "
            "qwen2vl (a Qwen2-VL directory on the python backend), vllm (Qwen2-VL on Triton's "
            "vLLM backend behind the adapter: writes `mllm` and `mllm_vllm`)."
        ),
    ] = "none",
    mllm_path: Annotated[
        str,
        typer.Option(
            help="qwen2vl/vllm: the Qwen2-VL directory as the serving Triton sees it "
            "(in compose: /models/Qwen2-VL-7B-Instruct)."
        ),
    ] = "",
    mllm_out: Annotated[
        Path | None,
        typer.Option(
            help="Repository for the MLLM models (default: --out; with vllm, the repository "
            "of the vLLM Triton image)."
        ),
    ] = None,
    mllm_options: Annotated[
        str,
        typer.Option(
            help='JSON keyword options of the backend, e.g. \'{"device": "cuda"}\' (qwen2vl) '
            "or '{\"image_pixels\": 50176}' (vllm)."
        ),
    ] = "{}",
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
    write_mllm = mllm_writer(mllm, mllm_path, mllm_options)
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
    if write_mllm is not None:
        try:
            folders = write_mllm(mllm_out or out)
        except (ValueError, OSError, TypeError) as exc:  # TypeError: an unknown option
            raise fail(f"--mllm {mllm}: {exc}") from None
        names = ", ".join(f.name for f in folders)
        console.print(f"MLLM ({mllm}) written to {mllm_out or out}: {names}")
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


MLLM_CHOICES = ("none", "demo", "qwen2vl", "vllm")


def mllm_writer(choice: str, path: str, options_json: str) -> Any:
    """A function writing the chosen MLLM models into a repository (None for "none"); every
    argument is checked here, before minutes of export."""
    from icl.export.mllm_repository import write_mllm_model, write_vllm_adapter

    if choice not in MLLM_CHOICES:
        raise fail(f"--mllm must be one of {', '.join(MLLM_CHOICES)}, got {choice!r}")
    try:
        options = json.loads(options_json)
    except json.JSONDecodeError as exc:
        raise fail(f"--mllm-options is not JSON: {exc}") from None
    if not isinstance(options, dict):
        raise fail("--mllm-options must be a JSON object")
    if choice in ("qwen2vl", "vllm") and not path:
        raise fail(f"--mllm {choice} needs --mllm-path (the Qwen2-VL directory)")
    if choice == "none":
        return None
    if choice == "demo":
        return lambda out: [write_mllm_model(out, "demo", None, options=options)]
    if choice == "qwen2vl":
        return lambda out: [write_mllm_model(out, "qwen2vl", path, options=options)]
    known = {"image_pixels", "dtype", "instances", "logprobs", "engine"}
    if set(options) - known:
        raise fail(f"--mllm vllm takes options {sorted(known)}, not {sorted(set(options) - known)}")
    return lambda out: write_vllm_adapter(out, path, **options)


def register(app: typer.Typer) -> None:
    app.command()(export)
