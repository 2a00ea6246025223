"""`icl console`: the operator console (Streamlit) against a PersonSearch service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from icl.cli.common import (
    DEFAULT_ADDRESS,
    CaFileOption,
    CertFileOption,
    KeyFileOption,
    TokenOption,
    console,
    fail,
    tls_options,
)

INSTALL_HINT = "the console needs Streamlit: pip install -e '.[ui]'"


def app_path() -> Path:
    """ui/app.py of the installed console package."""
    import icl_console

    return Path(icl_console.__file__).resolve().parent / "app.py"


def console_command(port: int, host: str = "127.0.0.1") -> list[str]:
    """The `streamlit run` command line for the console (headless, no usage statistics)."""
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app_path()),
        "--server.headless=true",
        f"--server.address={host}",
        f"--server.port={port}",
        "--browser.gatherUsageStats=false",
        "--client.toolbarMode=viewer",  # no developer menu or Deploy button for operators
    ]


def console_env(
    address: str,
    token: str | None = None,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    metrics_url: str | None = None,
) -> dict[str, str]:
    """The console's settings, passed through its environment (never its command line, which
    other users of the machine can read)."""
    env = {**os.environ, "ICL_ADDRESS": address}
    for name, value in (
        ("ICL_TOKEN", token),
        ("ICL_CA_FILE", ca_file),
        ("ICL_CERT_FILE", cert_file),
        ("ICL_KEY_FILE", key_file),
        ("ICL_METRICS_URL", metrics_url),
    ):
        if value:
            env[name] = str(value)
    return env


def streamlit_available() -> bool:
    try:
        import streamlit  # noqa: F401
    except ImportError:
        return False
    return True


def console_cmd(
    address: Annotated[
        str, typer.Option(envvar="ICL_ADDRESS", help="PersonSearch address.")
    ] = DEFAULT_ADDRESS,
    port: Annotated[int, typer.Option(help="Port of the console's web page.")] = 8501,
    host: Annotated[
        str, typer.Option(help="Address the web page listens on (loopback by default).")
    ] = "127.0.0.1",
    metrics_url: Annotated[
        str | None,
        typer.Option(
            envvar="ICL_METRICS_URL",
            help="The service's Prometheus URL (http://HOST:PORT/metrics) for the Status page.",
        ),
    ] = None,
    token: TokenOption = None,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Run the operator console (a web page) against a running PersonSearch service."""
    if not streamlit_available():
        raise fail(INSTALL_HINT)
    tls_options(False, ca_file, cert_file, key_file)  # the same checks as icl search/enroll
    env = console_env(address, token, ca_file, cert_file, key_file, metrics_url)
    console.print(f"console for {address}: http://{host}:{port} (Ctrl-C stops it)")
    try:
        code = subprocess.call(console_command(port, host), env=env)
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("console")(console_cmd)
