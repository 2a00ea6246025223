"""`icl rda`: reorganisation data augmentation of a training set (docs/rda.md)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from icl.cli.common import console, fail


def _option_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _mllm_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--mllm-option takes KEY=VALUE, got {item!r}")
        out[key] = _option_value(value)
    return out


def rda(
    data: Annotated[
        Path, typer.Option(help="Annotation file (reid_raw.json or another format) or its root.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder; a stopped run here is resumed.")],
    mllm: Annotated[
        str, typer.Option(help="demo | qwen2vl (in process) | triton (the Triton `mllm` model).")
    ] = "demo",
    mllm_path: Annotated[
        Path | None, typer.Option(help="Model weights/folder (qwen2vl; demo: default committed).")
    ] = None,
    mllm_option: Annotated[
        list[str] | None,
        typer.Option(help="Backend option KEY=VALUE (repeatable), e.g. device=cuda."),
    ] = None,
    triton_url: Annotated[str, typer.Option(help="Triton gRPC address for --mllm triton.")] = (
        "127.0.0.1:8001"
    ),
    paraphrases: Annotated[int, typer.Option("-m", "--paraphrases", min=1, max=20)] = 5,
    split: Annotated[str, typer.Option(help="Split to augment; 'all' for every split.")] = "train",
    batch_size: Annotated[int, typer.Option(min=1, max=1024, help="Captions per batch.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=8, help="Generated tokens per MLLM call.")] = 256,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad",
            help="Augment the good records; copy problem records unchanged (counted).",
        ),
    ] = False,
    fmt: Annotated[str | None, typer.Option("--format", help="Dataset format.")] = None,
    threads: Annotated[int, typer.Option(min=1, help="Torch threads (in-process MLLM).")] = 2,
) -> None:
    """Enrich, decompose and rewrite every training caption (RDA); resumable."""
    import torch

    from icl.data.readers import DatasetError
    from icl.rda.pipeline import RdaInputError, RdaOptions, run_rda
    from icl.rda.progress import progress_bar
    from icl.rda.store import StateMismatch

    torch.set_num_threads(threads)
    options = RdaOptions(
        paraphrases=paraphrases,
        split=None if split == "all" else split,
        batch_size=batch_size,
        max_tokens=max_tokens,
        skip_bad=skip_bad,
    )
    backend_options = _mllm_options(mllm_option or [])

    async def main() -> Any:
        client = await _open_mllm(mllm, mllm_path, backend_options, triton_url)
        bar_ctx: list[Any] = []

        def progress(total: int, done: int):
            ctx = progress_bar("rda", total, done, unit="captions")
            bar_ctx.append(ctx)
            return ctx.__enter__()

        try:
            return await run_rda(data, out, client, options, fmt=fmt, progress=progress)
        finally:
            for ctx in bar_ctx:
                ctx.__exit__(None, None, None)
            close = getattr(client, "close", None)
            if close is not None:
                await close()

    try:
        summary = asyncio.run(main())
    except (DatasetError, RdaInputError, StateMismatch, ValueError) as exc:
        raise fail(str(exc)) from None
    problems = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in summary.problems.items())
    console.print(
        f"wrote {summary.out}: {summary.augmented}/{summary.captions} captions augmented "
        f"({summary.path} path, MLLM {summary.model_key}); "
        + (f"{summary.resumed_from} were done before this run; " if summary.resumed_from else "")
        + (f"problem records copied unchanged: {problems}; " if problems else "")
        + f"{summary.mllm_calls} MLLM calls, {summary.cache_hits} cache hits, "
        f"{summary.seconds / 60:.1f} min",
        highlight=False,
    )


async def _open_mllm(name: str, path: Path | None, options: dict[str, Any], url: str) -> Any:
    if name == "triton":
        # The Triton client lives in the service package; the core only sees the contract.
        from icl.orchestrator.triton.mllm import TritonMllm

        client = TritonMllm(url, **options)
        await client.start(ready_timeout_s=30.0)
        return client
    from icl.mllm.inprocess import InProcessMllm
    from icl.mllm.registry import BackendConfigError, load_backend

    try:
        backend = load_backend(name, path, **options)
    except (BackendConfigError, FileNotFoundError, ValueError) as exc:
        raise fail(str(exc)) from None
    return InProcessMllm(backend)


def register(app: typer.Typer) -> None:
    app.command()(rda)
