"""Where the console finds the service: the shared client settings (ICL_ADDRESS, ICL_TOKEN,
ICL_TLS, ICL_CA_FILE, ICL_CERT_FILE, ICL_KEY_FILE, ICL_TIMEOUT or the `[client]` table of
ICL_CONFIG; `icl.orchestrator.settings.ClientSettings`), plus ICL_METRICS_URL for the Status
page. `icl console` passes its options through that environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from icl.orchestrator.settings import ClientSettings
from icl_api.client import DEFAULT_ADDRESS, TlsOptions


@dataclass(frozen=True)
class ConsoleSettings:
    """A frozen copy of the client settings: hashable, so it keys the cached client."""

    address: str = DEFAULT_ADDRESS
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    metrics_url: str | None = None  # the service's /metrics, for the Status page
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> ConsoleSettings:
        config = os.environ.get("ICL_CONFIG")
        client = ClientSettings.load(Path(config) if config else None)
        return cls(
            address=client.address,
            token=client.token.get_secret_value() or None,
            tls=client.uses_tls,
            ca_file=str(client.ca_file) if client.ca_file else None,
            cert_file=str(client.cert_file) if client.cert_file else None,
            key_file=str(client.key_file) if client.key_file else None,
            metrics_url=os.environ.get("ICL_METRICS_URL") or None,
            timeout_s=client.timeout,
        )

    def tls_options(self) -> TlsOptions | None:
        if not self.tls:
            return None
        return TlsOptions(
            ca_file=Path(self.ca_file) if self.ca_file else None,
            cert_file=Path(self.cert_file) if self.cert_file else None,
            key_file=Path(self.key_file) if self.key_file else None,
        )

    def __repr__(self) -> str:  # never show the token
        token = "***" if self.token else None
        return f"ConsoleSettings(address={self.address!r}, token={token}, tls={self.tls})"
