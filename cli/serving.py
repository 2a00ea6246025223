"""`icl triton` and `icl serve`: the bundled tritonserver and the PersonSearch service."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from icl.cli.common import (
    WORKDIR,
    console,
    fail,
    install_stop_signals,
    server_died,
    setup_logging,
    until_stopped,
)


def triton(
    model_repository: Annotated[Path, typer.Option(help="Model repository to serve.")] = WORKDIR
    / "model_repository",
    grpc_port: Annotated[int, typer.Option(help="0: a free port.")] = 8001,
    http_port: Annotated[int, typer.Option(help="0: a free port.")] = 8000,
    host: Annotated[
        str, typer.Option(help="Address to bind (0.0.0.0 only inside a container or behind TLS).")
    ] = "127.0.0.1",
    log_file: Annotated[Path, typer.Option(help="Where the server log goes.")] = WORKDIR
    / "tritonserver.log",
) -> None:
    """Run the bundled tritonserver (CPU, python backend) until stopped (loopback by default)."""
    from icl.orchestrator.tritonserver import TritonLaunchError, TritonServer

    server = TritonServer(
        model_repository, log_file, grpc_port=grpc_port, http_port=http_port, host=host
    )
    try:
        server.start()
    except TritonLaunchError as exc:
        raise fail(str(exc)) from None
    console.print(
        f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}, log {log_file}"
    )

    async def wait() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await until_stopped(stop, lambda: server.running)

    try:
        asyncio.run(wait())
        died = not server.running
    finally:
        server.stop()
    if died:
        raise server_died(server)


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
    mllm_url: Annotated[
        str,
        typer.Option(
            envvar="ICL_MLLM_URL",
            help="Triton gRPC address of the MLLM when it runs in its own Triton ('' = "
            "--triton-url).",
        ),
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
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="ICL_TLS_CERT",
            help="Serve TLS with this certificate chain (PEM); needs --tls-key.",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="ICL_TLS_KEY", help="The certificate's key (PEM).", show_default=False),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="ICL_TLS_CLIENT_CA",
            help="Require client certificates signed by this CA (PEM): mutual TLS.",
            show_default=False,
        ),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        typer.Option(
            envvar="ICL_TOKENS_FILE",
            help="Bearer tokens and their permissions (search, enroll, admin), TOML or JSON; "
            "format in docs/serving.md. None: no authentication (loopback only).",
            show_default=False,
        ),
    ] = None,
    metrics_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            envvar="ICL_METRICS_PORT",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (0: off).",
        ),
    ] = 0,
    log_format: Annotated[
        str,
        typer.Option(
            envvar="ICL_LOG_FORMAT",
            help="text | json (one object per line: time, level, logger, message, request_id).",
        ),
    ] = "text",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the PersonSearch gRPC service against a running Triton and Milvus."""
    from icl.orchestrator.auth import TokensFileError, TokenTable
    from icl.orchestrator.logs import LOG_FORMATS
    from icl.orchestrator.server import Orchestrator, OrchestratorConfig

    if log_format not in LOG_FORMATS:
        raise fail(f"--log-format is {' | '.join(LOG_FORMATS)}, not {log_format!r}")
    setup_logging(verbose, log_format)
    if thi_schedule not in ("lean", "reference") or thi_walk not in ("lazy", "batched"):
        raise fail("--thi-schedule is lean|reference and --thi-walk is lazy|batched")
    if tls_client_ca is not None and tls_cert is None:
        raise fail("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    try:
        tokens = TokenTable.load(tokens_file) if tokens_file is not None else None
    except TokensFileError as exc:
        raise fail(str(exc)) from None
    config = OrchestratorConfig(
        triton_url,
        milvus_uri,
        milvus_token,
        collection,
        host,
        port,
        triton_ready_timeout_s=triton_wait,
        mllm_model=mllm_model,
        mllm_url=mllm_url,
        crop_dir=crop_dir,
        mllm_timeout_s=mllm_timeout,
        thi_schedule=thi_schedule,
        thi_walk=thi_walk,
        search_ef=search_ef,
        filtered_search_ef=filtered_search_ef,
        health_poll_s=health_poll_s,
        grace_s=grace_s,
        tls_cert=str(tls_cert or ""),
        tls_key=str(tls_key or ""),
        tls_client_ca=str(tls_client_ca or ""),
        tokens=tokens,
        metrics_port=metrics_port,
    )
    try:
        config.server_credentials()  # unreadable or unpaired PEM files fail here, not later
    except (OSError, ValueError) as exc:
        raise fail(f"TLS: {exc}") from None

    async def run() -> None:
        orchestrator = Orchestrator(config)
        stop = asyncio.Event()
        install_stop_signals(stop)
        await start_or_fail(orchestrator)
        if log_format == "json":  # stdout too stays one JSON object per line
            logging.getLogger("icl.cli").info("PersonSearch serving on %s", orchestrator.address)
        else:
            console.print(f"PersonSearch serving on {orchestrator.address}", highlight=False)
        try:
            await stop.wait()
        finally:
            await orchestrator.stop()

    asyncio.run(run())


async def start_or_fail(orchestrator: Any) -> None:
    from icl.orchestrator.gallery import GalleryError
    from icl.orchestrator.triton.encoders import EncoderUnavailable
    from icl.orchestrator.triton.mllm import MllmError

    try:
        await orchestrator.start()
    except (EncoderUnavailable, GalleryError, MllmError, OSError) as exc:
        await orchestrator.stop()
        raise fail(str(exc)) from None


def register(app: typer.Typer) -> None:
    app.command()(triton)
    app.command()(serve)
