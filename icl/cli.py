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
    instances: Annotated[int, typer.Option(min=1, help="Triton instances per model.")] = 1,
    threads: Annotated[
        int, typer.Option(min=1, help="onnxruntime intra-op threads per instance.")
    ] = 1,
    max_batch_size: Annotated[int, typer.Option(min=1)] = 64,
) -> None:
    """Export a dual encoder to ONNX and write a CPU-flavour Triton model repository."""
    from icl.export.onnx_export import ParityError
    from icl.export.repository import CpuServingSettings, write_repository

    settings = CpuServingSettings(
        max_batch_size=max_batch_size, instances=instances, intra_op_threads=threads
    )
    try:
        reports = write_repository(_load_model(checkpoint), out, settings)
    except ParityError as exc:
        raise _fail(str(exc)) from None
    for r in reports:
        console.print(
            f"{r.tower} encoder: min cosine vs torch {r.min_cosine:.7f}, "
            f"max |diff| {r.max_abs_diff:.1e}"
        )
    console.print(f"model repository written to {out}")


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the PersonSearch gRPC service against a running Triton and Milvus."""
    from icl.orchestrator.server import Orchestrator, OrchestratorConfig

    _setup_logging(verbose)
    config = OrchestratorConfig(
        triton_url,
        milvus_uri,
        milvus_token,
        collection,
        host,
        port,
        triton_ready_timeout_s=triton_wait,
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
    from icl.orchestrator.encoders import EncoderUnavailable
    from icl.orchestrator.gallery import GalleryError

    try:
        await orchestrator.start()
    except (EncoderUnavailable, GalleryError, OSError) as exc:
        await orchestrator.stop()
        raise _fail(str(exc)) from None


@app.command()
def demo(
    workdir: Annotated[
        Path, typer.Option(help="Where the model repository, gallery and logs go.")
    ] = WORKDIR,
    images: Annotated[int, typer.Option(min=1, max=100_000, help="Demo gallery size.")] = 300,
    port: Annotated[int, typer.Option(help="Orchestrator port (0: a free port).")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option(help="Dual-encoder checkpoint (default: the demo model).")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Run sample searches and exit instead of serving.")
    ] = False,
) -> None:
    """Export the demo encoders, start Triton and the orchestrator, enrol a demo gallery, serve."""
    from icl.export.repository import write_repository
    from icl.orchestrator.server import OrchestratorConfig
    from icl.orchestrator.tritonserver import TritonLaunchError, TritonServer

    repo = workdir / "model_repository"
    with console.status("exporting the demo encoders to ONNX"):
        write_repository(_load_model(checkpoint), repo)
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
                    response = await stub.Search(search_request(text, top_k=5), timeout=30)
                    print_hits(text, response)
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
) -> None:
    """Search the gallery of a running PersonSearch service and print the ranked hits."""
    import grpc

    from icl.orchestrator.client import search as call
    from icl.orchestrator.client import search_request

    request = search_request(
        text, top_k, camera or (), _parse_time(since, "since"), _parse_time(until, "until")
    )
    try:
        response = call(address, request, timeout)
    except grpc.RpcError as exc:
        raise _fail(f"{exc.code().name}: {exc.details()} ({address})") from None
    print_hits(text, response)


def _register_ml_commands() -> None:
    from icl.ml_cli import register

    register(app)


_register_ml_commands()

if __name__ == "__main__":
    app()
