"""`icl enroll DIR|JSON`: bulk-load crops into a running PersonSearch service through Enroll.

A directory: every JPEG/PNG/WebP/BMP file below it; the image id is its path relative to the
directory (without suffix, '/' kept), the camera is --camera or the first folder name, the
capture time is the file's modification time. A JSON file: a list of objects (or JSON Lines)
with `image_id`, `camera_id`, `captured_at` (ISO-8601 or epoch milliseconds), `path`
(relative to the JSON file) and optional `track_id` and `image_uri`.
Enroll is idempotent by image id, so an interrupted load is finished by running it again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from icl.cli.common import (
    DEFAULT_ADDRESS,
    CaFileOption,
    CertFileOption,
    KeyFileOption,
    TlsFlag,
    TokenOption,
    console,
    err,
    fail,
    tls_options,
)
from icl_api import AsyncPersonSearchClient, gallery_image, pb
from icl_api.client import TlsOptions, open_channel

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class EnrollInputError(ValueError):
    """The DIR or JSON given to `icl enroll` cannot be read; the message says where."""


@dataclass(frozen=True)
class Item:
    image_id: str
    camera_id: str
    captured_at_ms: int
    path: Path
    track_id: str = ""
    image_uri: str = ""


def _time_ms(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise EnrollInputError(f"{where}: captured_at must be ISO-8601 or epoch ms")
    if isinstance(value, int | float):
        return int(value)
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        raise EnrollInputError(
            f"{where}: captured_at {str(value)[:40]!r} is not ISO-8601 or epoch milliseconds"
        ) from None
    parsed = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp() * 1000)


def items_from_dir(root: Path, camera: str | None) -> list[Item]:
    items = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(root)
        cam = camera or (rel.parts[0] if len(rel.parts) > 1 else "")
        if not cam:
            raise EnrollInputError(
                f"{path}: no camera; put crops in one folder per camera or pass --camera"
            )
        items.append(
            Item(
                image_id=rel.with_suffix("").as_posix(),
                camera_id=cam,
                captured_at_ms=int(path.stat().st_mtime * 1000),
                path=path,
                image_uri=path.resolve().as_uri(),
            )
        )
    return items


def items_from_json(manifest: Path) -> list[Item]:
    text = manifest.read_text(encoding="utf-8")
    try:
        stripped = text.lstrip()
        if stripped.startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise EnrollInputError(f"{manifest}: not JSON or JSON Lines ({exc})") from None
    items = []
    for n, row in enumerate(rows, 1):
        where = f"{manifest} entry {n}"
        if not isinstance(row, dict):
            raise EnrollInputError(f"{where}: expected an object")
        missing = [k for k in ("image_id", "camera_id", "captured_at", "path") if k not in row]
        if missing:
            raise EnrollInputError(f"{where}: missing {', '.join(missing)}")
        path = manifest.parent / str(row["path"])
        items.append(
            Item(
                image_id=str(row["image_id"]),
                camera_id=str(row["camera_id"]),
                captured_at_ms=_time_ms(row["captured_at"], where),
                path=path,
                track_id=str(row.get("track_id", "")),
                image_uri=str(row.get("image_uri", "")),
            )
        )
    return items


def load_items(source: Path, camera: str | None = None) -> list[Item]:
    if source.is_dir():
        return items_from_dir(source, camera)
    if source.is_file():
        return items_from_json(source)
    raise EnrollInputError(f"{source} is neither a directory nor a JSON file")


@dataclass
class Summary:
    accepted: int = 0
    rejected: int = 0
    reasons: dict[str, str] | None = None


def _gallery_images(items: list[Item], summary: Summary) -> Iterator[Any]:
    for item in items:
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            data = b""  # the service rejects it as empty; keep the item's place in the report
            summary.reasons = summary.reasons or {}
            summary.reasons[item.image_id] = f"cannot read {item.path}: {exc.strerror}"
        yield gallery_image(
            item.image_id,
            item.camera_id,
            item.captured_at_ms,
            data,
            track_id=item.track_id,
            image_uri=item.image_uri,
        )


async def enroll_items(
    address: str,
    items: list[Item],
    batch_size: int,
    timeout_s: float | None,
    quiet: bool,
    tls: TlsOptions | None = None,
    token: str | None = None,
) -> Summary:
    summary = Summary(reasons={})
    progress = Progress(
        TextColumn("enrolling"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )
    with progress:
        task = progress.add_task("enroll", total=len(items), rate="")
        start = asyncio.get_running_loop().time()
        async with AsyncPersonSearchClient(address, tls=tls, token=token) as client:
            async for response in client.enroll(
                _gallery_images(items, summary), batch_size, timeout_s
            ):
                for r in response.results:
                    if r.status == pb.EnrollResult.ACCEPTED:
                        summary.accepted += 1
                    else:
                        summary.rejected += 1
                        assert summary.reasons is not None
                        summary.reasons.setdefault(r.image_id, r.reason)
                done = summary.accepted + summary.rejected
                elapsed = max(asyncio.get_running_loop().time() - start, 1e-9)
                progress.update(task, completed=done, rate=f"{done / elapsed:.0f} img/s")
    return summary


def service_reachable(address: str, timeout_s: float = 2.0, tls: TlsOptions | None = None) -> bool:
    """Whether a fresh connection to `address` comes up within `timeout_s` (with TLS: the
    handshake too, with the same options as the load)."""
    with open_channel(address, tls) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            return False
    return True


def enroll_command(
    source: Annotated[
        Path, typer.Argument(help="A directory of crops, or a JSON / JSON Lines manifest.")
    ],
    address: Annotated[
        str, typer.Option(envvar="ICL_ADDRESS", help="PersonSearch address.")
    ] = DEFAULT_ADDRESS,
    camera: Annotated[
        str | None, typer.Option(help="Camera id for every crop of a directory.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=256, help="Crops per Enroll batch.")] = 64,
    timeout: Annotated[
        float | None, typer.Option(help="Deadline in seconds for the whole load.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    token: TokenOption = None,
    tls: TlsFlag = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Enrol crops into a running PersonSearch service (idempotent: re-run to resume)."""
    try:
        items = load_items(source, camera)
    except (EnrollInputError, OSError) as exc:
        raise fail(str(exc)) from None
    if not items:
        raise fail(f"{source} holds no crops ({', '.join(sorted(IMAGE_SUFFIXES))})")
    tls_opts = tls_options(tls, ca_file, cert_file, key_file)
    if not service_reachable(address, timeout_s=min(timeout or 5.0, 5.0), tls=tls_opts):
        # Before the load: nothing was sent, so nothing "went away".
        how = " (with TLS: check --ca-file, the client certificate and the server's name)"
        raise fail(
            f"UNAVAILABLE: cannot connect to the PersonSearch service at {address}"
            + (how if tls_opts is not None else "")
        )
    try:
        summary = asyncio.run(
            enroll_items(address, items, batch_size, timeout, quiet, tls_opts, token)
        )
    except grpc.RpcError as exc:
        resume = "what was acknowledged is stored: run the same command again to finish"
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The service is there and refused this token: nothing about it going away.
            raise fail(f"{exc.code().name}: {exc.details()} ({address})") from None
        if not service_reachable(address, tls=tls_opts):
            # A stream cut by a dying server surfaces as INTERNAL ("Internal error from
            # Core") or CANCELLED; what the user needs to know is that the service went away.
            raise fail(
                f"UNAVAILABLE: the PersonSearch service at {address} went away during the "
                f"load ({exc.code().name}: {exc.details()}); {resume}"
            ) from None
        raise fail(f"{exc.code().name}: {exc.details()} ({address}); {resume}") from None
    for image_id, reason in list((summary.reasons or {}).items())[:20]:
        err.print(f"rejected {image_id}: {reason}", highlight=False, soft_wrap=True)
    console.print(f"enrolled {summary.accepted}, rejected {summary.rejected} of {len(items)}")
    if summary.rejected:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command(name="enroll")(enroll_command)
