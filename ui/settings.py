"""Where the console finds the service: address, token and TLS files, from the environment
that `icl console` (or the operator) sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from icl_api.client import DEFAULT_ADDRESS, TlsOptions


@dataclass(frozen=True)
class ConsoleSettings:
    address: str = DEFAULT_ADDRESS
    token: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    metrics_url: str | None = None  # the service's /metrics, for the Status page
    timeout_s: float = 30.0

    @classmethod
    def from_env(cls) -> ConsoleSettings:
        env = os.environ
        token = env.get("ICL_TOKEN") or None
        token_file = env.get("ICL_TOKEN_FILE")
        if token is None and token_file:
            token = Path(token_file).read_text(encoding="utf-8").strip() or None
        return cls(
            address=env.get("ICL_ADDRESS", DEFAULT_ADDRESS),
            token=token,
            ca_file=env.get("ICL_CA_FILE") or None,
            cert_file=env.get("ICL_CERT_FILE") or None,
            key_file=env.get("ICL_KEY_FILE") or None,
            server_name=env.get("ICL_SERVER_NAME") or None,
            metrics_url=env.get("ICL_METRICS_URL") or None,
            timeout_s=float(env.get("ICL_TIMEOUT_S", "30")),
        )

    def tls(self) -> TlsOptions | None:
        if not self.ca_file:
            return None
        return TlsOptions(
            ca_file=Path(self.ca_file),
            cert_file=Path(self.cert_file) if self.cert_file else None,
            key_file=Path(self.key_file) if self.key_file else None,
            server_name=self.server_name,
        )

    def __repr__(self) -> str:  # never show the token
        token = "***" if self.token else None
        return f"ConsoleSettings(address={self.address!r}, token={token}, tls={bool(self.ca_file)})"
