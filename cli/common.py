"""What every `icl` command group shares: consoles, the one-line error, logging, signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from icl_api.client import DEFAULT_ADDRESS, TlsOptions

console = Console()
err = Console(stderr=True)

WORKDIR = Path(".icl")
__all__ = ["DEFAULT_ADDRESS", "WORKDIR", "console", "err", "fail"]

# The connection options of the client commands (`icl search`, `icl enroll`). The token is
# never shown: no default in --help, and no command prints it.
TokenOption = Annotated[
    str | None,
    typer.Option(
        envvar="ICL_TOKEN",
        help="Bearer token for the service (better from the environment: ICL_TOKEN).",
        show_default=False,
    ),
]
TlsFlag = Annotated[
    bool,
    typer.Option(
        "--tls", envvar="ICL_TLS", help="TLS with the system's trusted CAs (implied by --ca-file)."
    ),
]
CaFileOption = Annotated[
    Path | None,
    typer.Option(envvar="ICL_CA_FILE", help="TLS: trust this CA (PEM).", show_default=False),
]
CertFileOption = Annotated[
    Path | None,
    typer.Option(
        envvar="ICL_CERT_FILE", help="Mutual TLS: client certificate (PEM).", show_default=False
    ),
]
KeyFileOption = Annotated[
    Path | None,
    typer.Option(
        envvar="ICL_KEY_FILE", help="Mutual TLS: the client key (PEM).", show_default=False
    ),
]


def tls_options(
    tls: bool, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> TlsOptions | None:
    """The client's TLS options from the command line (None: plaintext)."""
    if (cert_file is None) != (key_file is None):
        raise fail("--cert-file and --key-file go together (mutual TLS)")
    if not (tls or ca_file or cert_file):
        return None
    for path in (ca_file, cert_file, key_file):
        if path is not None and not path.is_file():
            raise fail(f"TLS: {path} is not a readable file")
    return TlsOptions(ca_file, cert_file, key_file)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print `error: message` on stderr; raise the result to exit with `code`."""
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def setup_logging(verbose: bool, log_format: str | None = None) -> None:
    """Root logging; `log_format` (text | json, the service's, with request ids) or the
    plain format when None."""
    level = logging.INFO if verbose else logging.WARNING
    if log_format is None:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    from icl.orchestrator.logs import configure_logging

    configure_logging(level, log_format)


def install_stop_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def until_stopped(stop: asyncio.Event, alive: Callable[[], bool] = lambda: True) -> None:
    """Until a stop signal, or until alive() turns False (a supervised server died)."""
    while alive() and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def server_died(server: Any) -> typer.Exit:
    return fail(f"tritonserver died (exit code {server.returncode}); log: {server.log_path}")


def parse_time(value: str | None, name: str) -> datetime | None:
    """An ISO-8601 option value (UTC when it names no zone)."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise fail(f"--{name} {value!r} is not an ISO-8601 time such as 2026-01-05T09:30") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def self_command() -> str:
    """How the user invoked `icl` (e.g. .venv/bin/icl), so a printed command runs as is."""
    invoked = Path(sys.argv[0])
    return str(invoked) if invoked.name == "icl" else "icl"
