"""Typed settings: the service's (`ServeSettings`, what `icl serve` runs with) and a client's
(`ClientSettings`: address, token, TLS files, deadline; for the console and the load test).

Each setting comes from, in rising precedence: its default, a TOML file (`[serve]` or
`[client]` table), the environment (`ICL_` + the name in capitals, e.g. ICL_METRICS_PORT), and
the command line (keyword arguments of `load`). Every problem is reported at once, one message
each, naming the setting and where it can be set (`SettingsProblem`); a secret's value is never
part of a message, a repr or `--print-config`.

This module is light on purpose (pydantic, pydantic-settings, the standard library): the console
and the load test import it without the ML core, tritonclient or pymilvus (import-linter
contract in tools/import_contracts.toml).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "ICL_"
MASK = "********"


@dataclass(frozen=True)
class ConcurrencyLimits:
    """Calls at once and waiting, per lane (orchestrator/limits.py admits them): THI searches
    (each holds the MLLM for seconds) apart from every other PersonSearch call."""

    thi_in_flight: int = 4
    thi_queue: int = 8
    in_flight: int = 64
    queue: int = 128
    queue_wait_s: float = 5.0


_DEFAULT_LIMITS = ConcurrencyLimits()


class SettingsProblem(ValueError):
    """The settings cannot be used; `problems` holds one message per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _LayeredSettings(BaseSettings):
    """Defaults < TOML file table `section` < environment < keyword arguments."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, frozen=True
    )
    section: ClassVar[str]
    secrets: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `load` passes the file's table as the `_file_values` keyword (see there).
        return (init_settings, env_settings)

    @classmethod
    def load(cls, config_file: Path | None = None, **cli: Any) -> Self:
        """The effective settings; `cli` holds only the options given on the command line."""
        file_values = _read_table(config_file, cls.section) if config_file is not None else {}
        unknown = sorted(set(file_values) - set(cls.model_fields))
        if unknown:
            raise SettingsProblem(
                [f"{config_file}: [{cls.section}] has no setting {name!r}" for name in unknown]
            )

        class _WithFile(cls):  # type: ignore[valid-type,misc]
            @classmethod
            def settings_customise_sources(
                cls_,
                settings_cls: type[BaseSettings],
                init_settings: PydanticBaseSettingsSource,
                env_settings: PydanticBaseSettingsSource,
                dotenv_settings: PydanticBaseSettingsSource,
                file_secret_settings: PydanticBaseSettingsSource,
            ) -> tuple[PydanticBaseSettingsSource, ...]:
                file_source = InitSettingsSource(settings_cls, init_kwargs=file_values)
                return (init_settings, env_settings, file_source)

        try:
            loaded = _WithFile(**cli)
        except ValidationError as exc:
            raise SettingsProblem(_messages(exc, cls)) from None
        return cls.model_construct(**{k: getattr(loaded, k) for k in cls.model_fields})

    def effective(self) -> dict[str, Any]:
        """Every setting's value, secrets masked (for `--print-config`)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = MASK if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            out[name] = value
        return out

    def render(self) -> str:
        """The effective settings as a TOML table that `--config` reads back (secrets masked;
        unset optional values commented out)."""
        lines = [f"[{self.section}]"]
        for name, value in self.effective().items():
            if value is None:
                lines.append(f"# {name} = (not set)")
            elif isinstance(value, bool):
                lines.append(f"{name} = {'true' if value else 'false'}")
            elif isinstance(value, int | float):
                lines.append(f"{name} = {value}")
            else:
                text = str(value).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{name} = "{text}"')
        return "\n".join(lines)


def _read_table(path: Path, section: str) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SettingsProblem([f"cannot read config file {path}: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        # The parser's message may quote a line holding a secret: give its position only.
        line = re.search(r"at line (\d+)", str(exc))
        where = f" (line {line.group(1)})" if line else ""
        raise SettingsProblem([f"config file {path} is not valid TOML{where}"]) from None
    table = data.get(section, {})
    if not isinstance(table, Mapping):
        raise SettingsProblem([f"config file {path}: `{section}` must be a table"])
    return dict(table)


def _messages(exc: ValidationError, cls: type[_LayeredSettings]) -> list[str]:
    out: list[str] = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        msg = str(error["msg"]).removeprefix("Value error, ")
        if name in cls.model_fields:
            where = (
                f"--{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()}, {name} in [{cls.section}]"
            )
            value = error.get("input")
            value = str(value) if isinstance(value, Path) else value
            shown = "" if name in cls.secrets else f" (got {value!r})"
            out.append(f"{name} ({where}): {msg}{shown}")
        else:
            out.append(msg)
    return out


def _existing_file(value: Path | None, what: str) -> Path | None:
    if value is not None and not value.is_file():
        raise ValueError(f"{what} {value} is not a readable file")
    return value


class ServeSettings(_LayeredSettings):
    """What `icl serve` runs with. Names are the command-line options (`--metrics-port`),
    the environment variables (ICL_METRICS_PORT) and the keys of the `[serve]` table."""

    section: ClassVar[str] = "serve"
    secrets: ClassVar[tuple[str, ...]] = ("milvus_token",)

    triton_url: str = Field("127.0.0.1:8001", min_length=1, description="Triton gRPC address.")
    milvus_uri: str = Field(
        ".icl/gallery.db",
        min_length=1,
        description="Milvus Lite data dir, or http(s)://host:port of a server.",
    )
    milvus_token: SecretStr = Field(
        SecretStr(""), description="user:password or API key (never logged)."
    )
    collection: str = Field("gallery", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="0: a free port.")
    triton_wait: float = Field(60.0, gt=0, description="Seconds to wait for Triton at start.")
    mllm_model: str = Field("", description="Triton model for THI ('' = THI off).")
    mllm_url: str = Field(
        "", description="Triton of the MLLM when it runs in its own ('' = triton_url)."
    )
    crop_dir: str = Field("", description="Where enrolled crops are kept for THI.")
    mllm_timeout: float = Field(20.0, gt=0, description="Seconds a search waits for the MLLM.")
    thi_schedule: Literal["lean", "reference"] = "lean"
    thi_walk: Literal["lazy", "batched"] = "lazy"
    search_ef: int | None = Field(None, ge=1, description="HNSW beam, unfiltered searches.")
    filtered_search_ef: int | None = Field(None, ge=1, description="HNSW beam, filtered.")
    health_poll_s: float = Field(1.0, ge=0.05, description="Seconds between dependency checks.")
    grace_s: float = Field(30.0, ge=0, description="SIGTERM: seconds in-flight calls may take.")
    tls_cert: Path | None = Field(None, description="Server certificate chain (PEM).")
    tls_key: Path | None = Field(None, description="The certificate's key (PEM).")
    tls_client_ca: Path | None = Field(None, description="CA of client certificates (mTLS).")
    tokens_file: Path | None = Field(None, description="Bearer tokens (TOML or JSON).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port (0: off).")
    log_format: Literal["text", "json"] = "text"
    verbose: bool = False
    max_thi_in_flight: int = Field(_DEFAULT_LIMITS.thi_in_flight, ge=1, le=10_000)
    thi_queue: int = Field(_DEFAULT_LIMITS.thi_queue, ge=0, le=100_000)
    max_in_flight: int = Field(_DEFAULT_LIMITS.in_flight, ge=1, le=10_000)
    queue: int = Field(_DEFAULT_LIMITS.queue, ge=0, le=100_000)
    queue_wait_s: float = Field(_DEFAULT_LIMITS.queue_wait_s, ge=0, le=600)

    @field_validator("tls_cert", "tls_key", "tls_client_ca", "tokens_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "file")

    @model_validator(mode="after")
    def _tls_pairs(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate (tls_cert) and its key (tls_key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        return self

    @property
    def concurrency(self) -> ConcurrencyLimits:
        return ConcurrencyLimits(
            self.max_thi_in_flight,
            self.thi_queue,
            self.max_in_flight,
            self.queue,
            self.queue_wait_s,
        )


class ClientSettings(_LayeredSettings):
    """How a client reaches the service (the console, the load test): ICL_ADDRESS, ICL_TOKEN,
    ICL_TLS, ICL_CA_FILE, ICL_CERT_FILE, ICL_KEY_FILE, ICL_TIMEOUT, or the `[client]` table."""

    section: ClassVar[str] = "client"
    secrets: ClassVar[tuple[str, ...]] = ("token",)

    address: str = Field("127.0.0.1:50051", min_length=1)
    token: SecretStr = Field(SecretStr(""), description="Bearer token (never shown).")
    tls: bool = Field(False, description="TLS with the system's CAs (implied by ca_file).")
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout: float = Field(30.0, gt=0, description="Deadline of a call in seconds.")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        return _existing_file(value, "file")

    @model_validator(mode="after")
    def _mtls_pair(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS)")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca_file is not None or self.cert_file is not None


__all__ = [
    "ClientSettings",
    "ConcurrencyLimits",
    "ServeSettings",
    "SettingsProblem",
]
