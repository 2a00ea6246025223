"""`icl triton` and `icl serve`: the bundled tritonserver and the PersonSearch service."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from icl.cli.common import (
    WORKDIR,
    console,
    fail,
    install_stop_signals,
    server_died,
    setup_logging,
    until_stopped,
)
from icl.orchestrator.settings import ServeSettings, SettingsProblem


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
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Triton's own Prometheus metrics (nv_inference_count, ...) at "
            "http://127.0.0.1:PORT/metrics (0: a free port; default: off).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the bundled tritonserver (CPU, python backend) until stopped (loopback by default)."""
    from icl.orchestrator.tritonserver import TritonLaunchError, TritonServer

    server = TritonServer(
        model_repository,
        log_file,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=host,
    )
    try:
        server.start()
    except TritonLaunchError as exc:
        raise fail(str(exc)) from None
    metrics = f", metrics {server.metrics_url}" if server.metrics_url else ""
    console.print(
        f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.http_url}{metrics}, "
        f"log {log_file}",
        highlight=False,
        soft_wrap=True,  # one line, whatever the terminal's width: scripts read it
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


def _opt(name: str, help: str) -> Any:
    # No default and no envvar here: an option left out is None, and the settings object
    # (orchestrator/settings.py) fills it from ICL_..., the --config file or its default,
    # which the help shows.
    default = ServeSettings.model_fields[name].default
    if default not in (None, "") and name not in ServeSettings.secrets and "default" not in help:
        help = f"{help.rstrip('.')} (default {default})."
    return typer.Option(help=help, show_default=False)


def serve(
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="ICL_CONFIG",
            help="TOML settings file (its serve table); the environment (ICL_...) and options win.",
            show_default=False,
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the effective settings and exit.")
    ] = False,
    triton_url: Annotated[str | None, _opt("triton_url", "Triton gRPC address.")] = None,
    milvus_uri: Annotated[
        str | None,
        _opt("milvus_uri", "Milvus Lite data dir, or http(s)://host:port of a server."),
    ] = None,
    milvus_token: Annotated[
        str | None,
        _opt("milvus_token", "user:password or API key (never logged; better ICL_MILVUS_TOKEN)."),
    ] = None,
    collection: Annotated[str | None, _opt("collection", "Milvus collection.")] = None,
    host: Annotated[str | None, _opt("host", "Address to listen on.")] = None,
    port: Annotated[int | None, _opt("port", "Port; 0: a free port.")] = None,
    triton_wait: Annotated[
        float | None, _opt("triton_wait", "Seconds to wait for Triton's models at start.")
    ] = None,
    mllm_model: Annotated[
        str | None, _opt("mllm_model", "Triton model for THI ('' = THI off).")
    ] = None,
    mllm_url: Annotated[
        str | None,
        _opt(
            "mllm_url",
            "Triton gRPC address of the MLLM when it runs in its own Triton ('' = --triton-url).",
        ),
    ] = None,
    crop_dir: Annotated[
        str | None,
        _opt(
            "crop_dir", "Where enrolled crops are kept for THI (default: beside the Lite data dir)."
        ),
    ] = None,
    mllm_timeout: Annotated[
        float | None, _opt("mllm_timeout", "Seconds a search waits for the MLLM before degrading.")
    ] = None,
    thi_schedule: Annotated[
        str | None, _opt("thi_schedule", "lean | reference (the paper's).")
    ] = None,
    thi_walk: Annotated[str | None, _opt("thi_walk", "lazy (fewest calls) | batched.")] = None,
    search_ef: Annotated[
        int | None,
        _opt("search_ef", "HNSW beam of unfiltered searches (default: the gallery's, 512)."),
    ] = None,
    filtered_search_ef: Annotated[
        int | None,
        _opt(
            "filtered_search_ef",
            "HNSW beam of camera/time-filtered searches (default: the gallery's, 1024; "
            "recall against ef: docs/gallery.md).",
        ),
    ] = None,
    health_poll_s: Annotated[
        float | None,
        _opt(
            "health_poll_s",
            "Seconds between checks of Triton and Milvus (gRPC health follows them).",
        ),
    ] = None,
    grace_s: Annotated[
        float | None,
        _opt(
            "grace_s",
            "On SIGTERM, seconds in-flight calls (THI searches, Enroll streams) may take "
            "to finish.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        _opt("tls_cert", "Serve TLS with this certificate chain (PEM); needs --tls-key."),
    ] = None,
    tls_key: Annotated[Path | None, _opt("tls_key", "The certificate's key (PEM).")] = None,
    tls_client_ca: Annotated[
        Path | None,
        _opt("tls_client_ca", "Require client certificates signed by this CA (PEM): mutual TLS."),
    ] = None,
    tokens_file: Annotated[
        Path | None,
        _opt(
            "tokens_file",
            "Bearer tokens and their permissions (search, enroll, admin), TOML or JSON; "
            "format in docs/serving.md. None: no authentication (loopback only).",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        _opt("metrics_port", "Serve Prometheus metrics at http://HOST:PORT/metrics (0: off)."),
    ] = None,
    log_format: Annotated[
        str | None,
        _opt(
            "log_format",
            "text | json (one object per line: time, level, logger, message, request_id).",
        ),
    ] = None,
    max_thi_in_flight: Annotated[
        int | None,
        _opt("max_thi_in_flight", "THI searches served at once; more wait in --thi-queue."),
    ] = None,
    thi_queue: Annotated[
        int | None, _opt("thi_queue", "THI searches that may wait; beyond: RESOURCE_EXHAUSTED.")
    ] = None,
    max_in_flight: Annotated[
        int | None, _opt("max_in_flight", "Other PersonSearch calls served at once (streams too).")
    ] = None,
    queue: Annotated[
        int | None, _opt("queue", "Other calls that may wait; beyond: RESOURCE_EXHAUSTED.")
    ] = None,
    queue_wait_s: Annotated[
        float | None, _opt("queue_wait_s", "Longest wait for a slot before RESOURCE_EXHAUSTED.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the PersonSearch gRPC service against a running Triton and Milvus.

    Settings: defaults < --config file < environment (ICL_NAME) < options (docs/operations.md).
    """
    options = dict(locals())  # the parameters, before any other local exists

    given = {
        name: value
        for name, value in options.items()
        if name in ServeSettings.model_fields and name != "verbose" and value is not None
    }
    if verbose:  # a flag: only its presence overrides ICL_VERBOSE and the file
        given["verbose"] = True
    try:
        settings = ServeSettings.load(config, **given)
    except SettingsProblem as exc:
        raise fail(escape("invalid settings: " + "; ".join(exc.problems))) from None
    if print_config:
        console.print(settings.render(), highlight=False, markup=False, soft_wrap=True)
        return

    from icl.orchestrator.auth import TokensFileError
    from icl.orchestrator.server import Orchestrator, OrchestratorConfig

    setup_logging(settings.verbose, settings.log_format)
    try:
        config_ = OrchestratorConfig.from_settings(settings)
    except TokensFileError as exc:
        raise fail(str(exc)) from None
    try:
        config_.server_credentials()  # unreadable or unmatched PEM files fail here, not later
    except (OSError, ValueError) as exc:
        raise fail(f"TLS: {exc}") from None
    log_format_ = settings.log_format

    async def run() -> None:
        orchestrator = Orchestrator(config_)
        stop = asyncio.Event()
        install_stop_signals(stop)
        await start_or_fail(orchestrator)
        if log_format_ == "json":  # stdout too stays one JSON object per line
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
