"""`icl gallery verify`: is every gallery row reachable by search, and what recall@k?"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from icl.cli.common import fail
from icl.orchestrator.gallery import GalleryError, MilvusGallery
from icl.orchestrator.gallery_verify import verify_gallery

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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:500] or type(exc).__name__


def register(app: typer.Typer) -> None:
    """Add the `gallery` command group to the `icl` app."""
    app.add_typer(gallery_app, name="gallery")
