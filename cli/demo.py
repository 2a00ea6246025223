"""`icl demo`: the whole stack on the embedded default, with a synthetic demo gallery."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from icl.cli.common import (
    WORKDIR,
    console,
    fail,
    install_stop_signals,
    self_command,
    server_died,
    until_stopped,
)
from icl.cli.export import load_model
from icl.cli.search import print_hits, print_trace
from icl.cli.serving import start_or_fail
from icl.synthetic.demo_gallery import DemoImage
from icl_api import AsyncPersonSearchClient, gallery_image, pb, search_request


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
    with_console: Annotated[
        bool,
        typer.Option(
            "--console/--no-console", help="Start the operator console too (needs the ui extra)."
        ),
    ] = True,
) -> None:
    """Export the demo encoders, start Triton and the orchestrator, enrol a demo gallery, serve."""
    from icl.export.mllm_repository import write_mllm_model
    from icl.export.repository import write_repository
    from icl.orchestrator.server import OrchestratorConfig
    from icl.orchestrator.tritonserver import TritonLaunchError, TritonServer

    repo = workdir / "model_repository"
    with console.status("exporting the demo encoders to ONNX"):
        write_repository(load_model(checkpoint), repo)
        write_mllm_model(repo, "demo", None)  # THI's MLLM: the demo image-question model
    triton_server = TritonServer(repo, workdir / "tritonserver.log")
    try:
        with console.status("starting tritonserver"):
            triton_server.start()
    except TritonLaunchError as exc:
        raise fail(str(exc)) from None
    try:
        config = OrchestratorConfig(
            triton_url=triton_server.grpc_url,
            milvus_uri=str(workdir / "gallery.db"),
            collection=f"demo_{images}",
            port=port,
            mllm_model="mllm",
        )
        ok = asyncio.run(
            _demo(config, images, check, lambda: triton_server.running, with_console, workdir)
        )
        died = not triton_server.running
    finally:
        triton_server.stop()
    if died:
        raise server_died(triton_server)
    if not ok:
        raise fail("the demo searches returned no hits")


async def _demo(
    config: Any,
    n_images: int,
    check: bool,
    alive: Callable[[], bool] = lambda: True,
    with_console: bool = False,
    workdir: Path = WORKDIR,
) -> bool:
    from icl.orchestrator.server import Orchestrator
    from icl.synthetic.demo_gallery import demo_gallery, demo_queries

    orchestrator = Orchestrator(config)
    stop = asyncio.Event()
    install_stop_signals(stop)
    await start_or_fail(orchestrator)
    try:
        async with AsyncPersonSearchClient(orchestrator.address) as client:
            items = (demo_enroll_item(d) for d in demo_gallery(n_images))
            accepted = 0
            with console.status("enrolling the demo gallery through Enroll") as status:
                async for response in client.enroll(items):
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
                    found_hits = await client.search(request, timeout_s=60)
                    print_hits(text, found_hits)
                    print_trace(found_hits.thi_trace)
                    # Demo image ids start with the identity they show (p00000-0, ...).
                    ranks = [
                        rank
                        for rank, hit in enumerate(found_hits.hits, 1)
                        if hit.image_id.startswith(f"p{person:05d}-")
                    ]
                    console.print(f"described person at ranks {ranks or 'none'} of the top 5")
                    found = found and len(found_hits.hits) > 0
                return found
        console.print(
            f"\nPersonSearch is serving on [bold]{orchestrator.address}[/] "
            f"(gRPC, health and reflection on). In another terminal:\n\n"
            f'  {self_command()} search --address {orchestrator.address} --text "{queries[0]}"',
            highlight=False,
            soft_wrap=True,  # keep the command on one line for copy and paste
        )
        web = _start_console(orchestrator.address, workdir) if with_console else None
        console.print("\nPress Ctrl-C to stop.")
        try:
            await until_stopped(stop, lambda: alive() and (web is None or web.poll() is None))
        finally:
            if web is not None:
                web.terminate()
                await asyncio.to_thread(web.wait, 10)
        return True
    finally:
        await orchestrator.stop()


def _start_console(address: str, workdir: Path) -> subprocess.Popen[bytes] | None:
    """The operator console on a free loopback port, or the one command that starts it."""
    from icl.cli.console import console_command, console_env, streamlit_available
    from icl.orchestrator.tritonserver import free_port

    if not streamlit_available():
        console.print(
            f"\nThe operator console: pip install -e '.[ui]' && "
            f"{self_command()} console --address {address}",
            highlight=False,
            soft_wrap=True,
        )
        return None
    port = free_port()
    log = open(workdir / "console.log", "ab")  # noqa: SIM115 - kept open for the child's life
    web = subprocess.Popen(
        console_command(port), env=console_env(address), stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    console.print(f"\nThe operator console: [bold]http://127.0.0.1:{port}[/]", highlight=False)
    return web


def demo_enroll_item(d: DemoImage, image_uri: str = "") -> pb.GalleryImage:
    """The Enroll item for a demo crop."""
    return gallery_image(
        d.image_id, d.camera_id, d.captured_at_ms, d.png, track_id=d.track_id, image_uri=image_uri
    )


def register(app: typer.Typer) -> None:
    app.command()(demo)
