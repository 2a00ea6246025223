"""`icl`: one command with subcommands for export, serving, the demo and searching."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="Text-to-image person search (ICL) on Triton and Milvus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err = Console(stderr=True)

WORKDIR = Path(".icl")
DEFAULT_ADDRESS = "127.0.0.1:50051"


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load_model(checkpoint: Path | None) -> Any:
    from icl.demo import DEMO_WEIGHTS, demo_path
    from icl.models.dual_encoder import CheckpointError, load_checkpoint

    checkpoint = checkpoint or demo_path(DEMO_WEIGHTS)
    if not checkpoint.is_file():
        raise _fail(f"checkpoint {checkpoint} does not exist")
    try:
        return load_checkpoint(checkpoint)
    except CheckpointError as exc:
        raise _fail(str(exc)) from None


@app.command()
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
        raise _fail(f"--flavour must be cpu or gpu, got {flavour!r}")
    if plans not in ("auto", "require", "skip"):
        raise _fail(f"--plans must be auto, require or skip, got {plans!r}")
    try:
        if flavour == "gpu" and plans == "require":
            require_trtexec()  # before minutes of export, not after
        delay = {} if max_queue_delay_us is None else {"max_queue_delay_us": max_queue_delay_us}
        if flavour == "cpu":
            settings: Any = CpuServingSettings(
                max_batch_size=max_batch_size,
                instances=instances,
                intra_op_threads=threads,
                **delay,
            )
            reports = write_repository(_load_model(checkpoint), out, settings)
        else:
            settings = GpuServingSettings(
                max_batch_size=max_batch_size,
                opt_batch_size=min(16, max_batch_size),
                instances=instances,
                precision=precision,  # validated by GpuServingSettings
                **delay,
            )
            reports = write_gpu_repository(_load_model(checkpoint), out, settings)
    except (ParityError, GraphContractError, TensorRTUnavailable, ValueError) as exc:
        raise _fail(str(exc)) from None
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
            raise _fail(str(exc)) from None
        console.print("TensorRT plans built")


def _install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


@app.command()
def triton(
    model_repository: Annotated[Path, typer.Option(help="Model repository to serve.")] = WORKDIR
    / "model_repository",
    grpc_port: Annotated[int, typer.Option(help="0: a free port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="0: a free port.")] = 8000,
    log_file: Annotated[Path, typer.Option(help="Where the server log goes.")] = WORKDIR
    / "tritonserver.log",
) -> None:
    """Run the bundled tritonserver (CPU, python backend) on loopback until stopped."""
    from icl.orchestrator.tritonserver import TritonLaunchError, TritonServer

    server = TritonServer(model_repository, log_file, grpc_port=grpc_port, http_port=http_port)
    try:
        server.start()
    except TritonLaunchError as exc:
        raise _fail(str(exc)) from None
    console.print(
        f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, log {log_file}"
    )

    async def wait() -> None:
        stop = asyncio.Event()
        _install_stop_signals(stop)
        await stop.wait()

    try:
        asyncio.run(wait())
    finally:
        server.stop()


@app.command()
def serve(
    triton_url: Annotated[
        str, typer.Option(envvar="ICL_TRITON_URL", help="Triton gRPC address.")
    ] = "127.0.0.1:8001",
    milvus_uri: Annotated[
        str,
        typer.Option(
            envvar="ICL_MILVUS_URI",
            help="Milvus Lite data dir, or http(s)://host:port of a server.",
        ),
    ] = str(WORKDIR / "gallery.db"),
    milvus_token: Annotated[
        str,
        typer.Option(
            envvar="ICL_MILVUS_TOKEN",
            help="user:password or API key (never logged).",
            show_default=False,
        ),
    ] = "",
    collection: Annotated[str, typer.Option(envvar="ICL_COLLECTION")] = "gallery",
    host: Annotated[str, typer.Option(envvar="ICL_HOST")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ICL_PORT", help="0: a free port.")] = 50051,
    triton_wait: Annotated[
        float, typer.Option(help="Seconds to wait for Triton's models at start.")
    ] = 60.0,
    mllm_model: Annotated[
        str,
        typer.Option(envvar="ICL_MLLM_MODEL", help="Triton model for THI ('' = THI off)."),
    ] = "",
    crop_dir: Annotated[
        str,
        typer.Option(
            envvar="ICL_CROP_DIR",
            help="Where enrolled crops are kept for THI (default: beside the Lite data dir).",
        ),
    ] = "",
    mllm_timeout: Annotated[
        float,
        typer.Option(
            envvar="ICL_MLLM_TIMEOUT", help="Seconds a search waits for the MLLM before degrading."
        ),
    ] = 20.0,
    thi_schedule: Annotated[
        str, typer.Option(envvar="ICL_THI_SCHEDULE", help="lean | reference (the paper's).")
    ] = "lean",
    thi_walk: Annotated[
        str, typer.Option(envvar="ICL_THI_WALK", help="lazy (fewest calls) | batched.")
    ] = "lazy",
    search_ef: Annotated[
        int | None,
        typer.Option(
            min=1,
            envvar="ICL_SEARCH_EF",
            help="HNSW beam of unfiltered searches (default: the gallery's, 512).",
            show_default=False,
        ),
    ] = None,
    filtered_search_ef: Annotated[
        int | None,
        typer.Option(
            min=1,
            envvar="ICL_FILTERED_SEARCH_EF",
            help="HNSW beam of camera/time-filtered searches (default: the gallery's, 1024; "
            "recall against ef: docs/gallery.md).",
            show_default=False,
        ),
    ] = None,
    health_poll_s: Annotated[
        float,
        typer.Option(
            min=0.05,
            envvar="ICL_HEALTH_POLL_S",
            help="Seconds between checks of Triton and Milvus (gRPC health follows them).",
        ),
    ] = 1.0,
    grace_s: Annotated[
        float,
        typer.Option(
            min=0.0,
            envvar="ICL_GRACE_S",
            help="On SIGTERM, seconds in-flight calls (THI searches, Enroll streams) may take "
            "to finish.",
        ),
    ] = 30.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the PersonSearch gRPC service against a running Triton and Milvus."""
    from icl.orchestrator.server import Orchestrator, OrchestratorConfig

    _setup_logging(verbose)
    if thi_schedule not in ("lean", "reference") or thi_walk not in ("lazy", "batched"):
        raise _fail("--thi-schedule is lean|reference and --thi-walk is lazy|batched")
    config = OrchestratorConfig(
        triton_url,
        milvus_uri,
        milvus_token,
        collection,
        host,
        port,
        triton_ready_timeout_s=triton_wait,
        mllm_model=mllm_model,
        crop_dir=crop_dir,
        mllm_timeout_s=mllm_timeout,
        thi_schedule=thi_schedule,
        thi_walk=thi_walk,
        search_ef=search_ef,
        filtered_search_ef=filtered_search_ef,
        health_poll_s=health_poll_s,
        grace_s=grace_s,
    )

    async def run() -> None:
        orchestrator = Orchestrator(config)
        stop = asyncio.Event()
        _install_stop_signals(stop)
        await _start_or_fail(orchestrator)
        console.print(f"PersonSearch serving on {orchestrator.address}", highlight=False)
        try:
            await stop.wait()
        finally:
            await orchestrator.stop()

    asyncio.run(run())


async def _start_or_fail(orchestrator: Any) -> None:
    from icl.orchestrator.gallery import GalleryError
    from icl.orchestrator.triton.encoders import EncoderUnavailable
    from icl.orchestrator.triton.mllm import MllmError

    try:
        await orchestrator.start()
    except (EncoderUnavailable, GalleryError, MllmError, OSError) as exc:
        await orchestrator.stop()
        raise _fail(str(exc)) from None


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the model repository, gallery and logs go.")
    ] = WORKDIR,
    images: Annotated[
        int,
        typer.Option(
            min=1,
            max=100_000,
            help="Demo gallery size (on Milvus Lite; past about 100k images serve the gallery "
            "from a Milvus server: docs/gallery.md).",
        ),
    ] = 300,
    port: Annotated[int, typer.Option(help="Orchestrator port (0: a free port).")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Dual-encoder checkpoint (default: the demo model).")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Run sample searches and exit instead of serving.")
    ] = False,
) -> None:
    """Export the demo encoders, start Triton and the orchestrator, enrol a demo gallery, serve."""
    from icl.export.mllm_repository import write_mllm_model
    from icl.export.repository import write_repository
    from icl.orchestrator.server import OrchestratorConfig
    from icl.orchestrator.tritonserver import TritonLaunchError, TritonServer

    repo = workdir / "model_repository"
    with console.status("exporting the demo encoders to ONNX"):
        write_repository(_load_model(checkpoint), repo)
        write_mllm_model(repo, "demo", None)  # THI's MLLM: the demo image-question model
    triton_server = TritonServer(repo, workdir / "tritonserver.log")
    try:
        with console.status("starting tritonserver"):
            triton_server.start()
    except TritonLaunchError as exc:
        raise _fail(str(exc)) from None
    try:
        config = OrchestratorConfig(
            triton_url=triton_server.grpc_url,
            milvus_uri=str(workdir / "gallery.db"),
            collection=f"demo_{images}",
            port=port,
            mllm_model="mllm",
        )
        ok = asyncio.run(_demo(config, images, check))
    finally:
        triton_server.stop()
    if not ok:
        raise _fail("the demo searches returned no hits")


async def _demo(config: Any, n_images: int, check: bool) -> bool:
    import grpc

    from icl.orchestrator.client import channel_options, enroll, search_request
    from icl.orchestrator.server import Orchestrator
    from icl.reid.v1 import person_search_pb2 as pb
    from icl.reid.v1 import person_search_pb2_grpc as pb_grpc
    from icl.synthetic.demo_gallery import demo_gallery, demo_queries, to_gallery_image

    orchestrator = Orchestrator(config)
    stop = asyncio.Event()
    _install_stop_signals(stop)
    await _start_or_fail(orchestrator)
    try:
        async with grpc.aio.insecure_channel(
            orchestrator.address, options=channel_options()
        ) as channel:
            stub = pb_grpc.PersonSearchStub(channel)
            items = (to_gallery_image(d) for d in demo_gallery(n_images))
            accepted = 0
            with console.status("enrolling the demo gallery through Enroll") as status:
                async for response in enroll(stub, items):
                    accepted += sum(r.status == pb.EnrollResult.ACCEPTED for r in response.results)
                    status.update(
                        f"enrolling the demo gallery through Enroll: {accepted}/{n_images}"
                    )
            console.print(f"enrolled {accepted} of {n_images} demo images")
            queries = demo_queries()
            if check:
                found = True
                for person, text in enumerate(queries):
                    request = search_request(text, top_k=5)
                    request.thi.enabled = True
                    response = await stub.Search(request, timeout=60)
                    print_hits(text, response)
                    print_trace(response.thi_trace)
                    # Demo image ids start with the identity they show (p00000-0, ...).
                    ranks = [
                        rank
                        for rank, hit in enumerate(response.hits, 1)
                        if hit.image_id.startswith(f"p{person:05d}-")
                    ]
                    console.print(f"described person at ranks {ranks or 'none'} of the top 5")
                    found = found and len(response.hits) > 0
                return found
        console.print(
            f"\nPersonSearch is serving on [bold]{orchestrator.address}[/] "
            f"(gRPC, health and reflection on). In another terminal:\n\n"
            f'  {_self_command()} search --address {orchestrator.address} --text "{queries[0]}"'
            "\n\nPress Ctrl-C to stop.",
            highlight=False,
            soft_wrap=True,  # keep the command on one line for copy and paste
        )
        await stop.wait()
        return True
    finally:
        await orchestrator.stop()


def _self_command() -> str:
    """How the user invoked `icl` (e.g. .venv/bin/icl), so the printed command runs as is."""
    invoked = Path(sys.argv[0])
    return str(invoked) if invoked.name == "icl" else "icl"


def print_hits(text: str, response: Any) -> None:
    table = Table(title=f"Search: {text}", title_justify="left")
    for column in ("rank", "image id", "camera", "captured (UTC)", "score"):
        table.add_column(column, justify="right" if column in ("rank", "score") else "left")
    for rank, hit in enumerate(response.hits, 1):
        when = hit.captured_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(str(rank), hit.image_id, hit.camera_id, when, f"{hit.score:.4f}")
    console.print(table)


def print_trace(trace: Any) -> None:
    """One line per THI step: which candidates were asked, the anchor, the refined query."""
    asked = ", ".join(
        f"#{c.base_rank} {c.image_id} P(Yes)={c.p_yes:.2f}" for c in trace.candidates if c.asked
    )
    console.print(f"THI asked: {asked or 'nobody'} ({trace.mllm_calls} MLLM calls)")
    if trace.fallback_reason:
        console.print(f"THI fell back to the base ranking: {trace.fallback_reason}")
    elif trace.anchor_image_id:
        console.print(f"THI anchor: {trace.anchor_image_id}; refined query: {trace.refined_query}")
    else:
        console.print("THI kept the base ranking (no anchor)")


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _fail(
            f"--{name} {value!r} is not an ISO-8601 time such as 2026-01-05T09:30"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command()
def search(
    text: Annotated[str, typer.Option("--text", "-t", help="Description of the person.")],
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 10,
    camera: Annotated[list[str] | None, typer.Option(help="Only this camera (repeatable).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Captured at or after (ISO-8601, UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Captured at or before (ISO-8601).")] = None,
    address: Annotated[
        str, typer.Option(envvar="ICL_ADDRESS", help="PersonSearch address.")
    ] = DEFAULT_ADDRESS,
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
    thi: Annotated[bool, typer.Option("--thi", help="Re-rank with THI (needs an mllm).")] = False,
    xi: Annotated[float | None, typer.Option(help="THI's xi (default 0.5).")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="THI's lambda (0.8).")] = None,
    candidates: Annotated[int | None, typer.Option(help="THI's K (default 5).")] = None,
) -> None:
    """Search the gallery of a running PersonSearch service and print the ranked hits."""
    import grpc

    from icl.orchestrator.client import search as call
    from icl.orchestrator.client import search_request

    request = search_request(
        text, top_k, camera or (), _parse_time(since, "since"), _parse_time(until, "until")
    )
    if thi:
        request.thi.enabled = True
        if xi is not None:
            request.thi.xi = xi
        if lam is not None:
            setattr(request.thi, "lambda", lam)
        if candidates is not None:
            request.thi.candidates = candidates
    try:
        response = call(address, request, timeout)
    except grpc.RpcError as exc:
        raise _fail(f"{exc.code().name}: {exc.details()} ({address})") from None
    print_hits(text, response)
    if thi:
        print_trace(response.thi_trace)


def _register_ml_commands() -> None:
    from icl.ml_cli import register
    from icl.orchestrator.enroll_cli import register as register_enroll

    register(app)
    register_enroll(app)


_register_ml_commands()

if __name__ == "__main__":
    app()
