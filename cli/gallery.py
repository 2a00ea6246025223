"""`icl gallery`: browse a running service's gallery (`list`, `show`, `stats`, over gRPC)
and check a Milvus collection directly (`verify`: is every row reachable by search?)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.table import Table

from icl.cli.common import (
    DEFAULT_ADDRESS,
    CaFileOption,
    CertFileOption,
    KeyFileOption,
    TlsFlag,
    TokenOption,
    console,
    fail,
    parse_time,
    tls_options,
)
from icl.orchestrator.gallery import GalleryError, MilvusGallery
from icl.orchestrator.gallery_verify import verify_gallery
from icl_api import PersonSearchClient

gallery_app = typer.Typer(help="Inspect the Milvus gallery.", no_args_is_help=True)


@gallery_app.command()
def verify(
    milvus_uri: Annotated[
        str,
        typer.Option(
            envvar="ICL_MILVUS_URI",
            help="Milvus Lite data dir, or http(s)://host:port of a server.",
        ),
    ] = ".icl/gallery.db",
    milvus_token: Annotated[
        str,
        typer.Option(
            envvar="ICL_MILVUS_TOKEN",
            help="user:password or API key (never printed).",
            show_default=False,
        ),
    ] = "",
    collection: Annotated[str, typer.Option(envvar="ICL_COLLECTION")] = "gallery",
    sample: Annotated[
        int, typer.Option(min=0, help="Rows to check (0: every row; each is one search).")
    ] = 1000,
    k: Annotated[int, typer.Option(min=1, max=16384, help="Recall@k against exact search.")] = 10,
) -> None:
    """Search for sampled rows' own vectors and compare with exact search.

    Prints recall@k and the ids of rows no search can reach (exit 1 if any). Every stored
    vector is read into memory (2 KB per 512-d row). Milvus Lite lets one process open a data
    dir: stop the service first (`icl serve` holds it), or verify through a Milvus server URI.
    """
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # failed RPCs log tracebacks
    try:
        gallery = MilvusGallery(milvus_uri, None, collection, milvus_token, inspect_only=True)
    except (GalleryError, OSError) as exc:
        raise fail(f"cannot open the gallery: {_one_line(exc)}") from None
    except Exception as exc:  # e.g. Lite's lock held by a running service
        raise fail(
            f"cannot open the gallery: {_one_line(exc)} (Milvus Lite allows one process "
            "per data dir: stop the service, or use a server URI)"
        ) from None
    try:
        report = verify_gallery(gallery, sample=sample, k=k)
    except (GalleryError, ValueError) as exc:
        raise fail(_one_line(exc)) from None
    finally:
        gallery.close()
    typer.echo(
        f"rows {report.rows}, sampled {report.sampled}, recall@{report.k} "
        f"{report.recall_at_k:.3f}, unreachable {len(report.unreachable)}"
    )
    for image_id in report.unreachable:
        typer.echo(f"unreachable: {image_id}")
    if report.unchecked:
        typer.echo(f"not checked (more than 16384 equal vectors): {len(report.unchecked)}")
    if report.unreachable:
        raise typer.Exit(1)


AddressOption = Annotated[str, typer.Option(envvar="ICL_ADDRESS", help="PersonSearch address.")]
TimeoutOption = Annotated[float, typer.Option(help="Deadline in seconds.")]


@contextmanager
def _client(
    address: str,
    timeout: float,
    token: str | None,
    tls: bool,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
) -> Iterator[PersonSearchClient]:
    """A client whose gRPC errors end the command with one line and exit code 2."""
    opts = tls_options(tls, ca_file, cert_file, key_file)
    try:
        with PersonSearchClient(address, tls=opts, token=token, timeout_s=timeout) as client:
            yield client
    except grpc.RpcError as exc:
        raise fail(f"{exc.code().name}: {exc.details()} ({address})") from None


def _when(ts: Any) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


@gallery_app.command("list")
def list_images(
    camera: Annotated[list[str] | None, typer.Option(help="Only this camera (repeatable).")] = None,
    since: Annotated[str | None, typer.Option(help="Captured at or after (ISO-8601).")] = None,
    until: Annotated[str | None, typer.Option(help="Captured at or before (ISO-8601).")] = None,
    page_size: Annotated[int, typer.Option(help="Images per page (1..1000).")] = 100,
    page_token: Annotated[
        str, typer.Option(help="Continue after this page (printed by the previous list).")
    ] = "",
    all_pages: Annotated[
        bool, typer.Option("--all", help="Every page, one after another.")
    ] = False,
    address: AddressOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = 30.0,
    token: TokenOption = None,
    tls: TlsFlag = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """List gallery images (ListImages), in image id order, one page or --all."""
    from icl_api import list_images_request

    request = list_images_request(
        page_size, camera or (), parse_time(since, "since"), parse_time(until, "until"), page_token
    )
    table = Table(title_justify="left")
    for column in ("image id", "camera", "captured (UTC)", "track", "uri"):
        table.add_column(column)
    with _client(address, timeout, token, tls, ca_file, cert_file, key_file) as client:
        while True:
            page = client.list_images(request)
            for image in page.images:
                table.add_row(
                    image.image_id,
                    image.camera_id,
                    _when(image.captured_at),
                    image.track_id,
                    image.image_uri,
                )
            request.page_token = page.next_page_token
            if not (all_pages and page.next_page_token):
                break
    console.print(table)
    if request.page_token:
        console.print(f"next page: --page-token {request.page_token}", soft_wrap=True)


@gallery_app.command()
def show(
    image_id: Annotated[str, typer.Argument(help="The gallery image id.")],
    out: Annotated[Path | None, typer.Option(help="Write the stored crop to this file.")] = None,
    address: AddressOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = 30.0,
    token: TokenOption = None,
    tls: TlsFlag = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """One image's metadata (GetImage), and its crop with --out."""
    with _client(address, timeout, token, tls, ca_file, cert_file, key_file) as client:
        image = client.get_image(image_id)
    console.print(f"image id:    {image.image_id}")
    console.print(f"camera:      {image.camera_id}")
    console.print(f"captured:    {_when(image.captured_at)} UTC")
    console.print(f"track:       {image.track_id or '-'}")
    console.print(f"uri:         {image.image_uri or '-'}")
    console.print(
        f"crop:        {len(image.image)} bytes" if image.image else "crop:        none stored"
    )
    if out is not None:
        if not image.image:
            raise fail(f"no crop is stored for {image_id}")
        out.write_bytes(image.image)
        console.print(f"wrote {out}")


@gallery_app.command()
def stats(
    address: AddressOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = 60.0,
    token: TokenOption = None,
    tls: TlsFlag = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Images in the gallery, per camera, oldest and newest capture time (GetGalleryStats)."""
    with _client(address, timeout, token, tls, ca_file, cert_file, key_file) as client:
        reply = client.gallery_stats()
    console.print(f"images: {reply.images}")
    if reply.HasField("oldest_captured_at"):
        console.print(f"oldest: {_when(reply.oldest_captured_at)} UTC")
        console.print(f"newest: {_when(reply.newest_captured_at)} UTC")
    for camera in reply.cameras:
        console.print(f"{camera.camera_id}: {camera.images}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def register(app: typer.Typer) -> None:
    """Add the `gallery` command group to the `icl` app."""
    app.add_typer(gallery_app, name="gallery")
