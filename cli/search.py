"""`icl search`: one Search call, printed as a table (and the THI trace)."""

from __future__ import annotations

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
from icl.thi.engine import is_failure
from icl_api import PersonSearchClient, search_request


def print_hits(text: str, response: Any, grouped: bool = False) -> None:
    table = Table(title=f"Search: {text}", title_justify="left")
    columns = ["rank", "image id", "camera", "captured (UTC)", "score"]
    if grouped:
        columns += ["track", "track hits"]
    for column in columns:
        table.add_column(
            column, justify="right" if column in ("rank", "score", "track hits") else "left"
        )
    for rank, hit in enumerate(response.hits, 1):
        when = hit.captured_at.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")
        row = [str(rank), hit.image_id, hit.camera_id, when, f"{hit.score:.4f}"]
        if grouped:
            row += [hit.track_id, str(hit.track_hits)]
        table.add_row(*row)
    console.print(table)


def print_event(event: Any) -> None:
    """One line per SearchStream step as it arrives (the final table comes after)."""
    kind = event.WhichOneof("event")
    if kind == "base":
        top = ", ".join(h.image_id for h in event.base.hits[:5])
        console.print(f"base ranking: {len(event.base.hits)} hits ({top}{', ...' if top else ''})")
    elif kind == "candidate":
        c = event.candidate
        console.print(f"THI asked #{c.base_rank} {c.image_id}: P(Yes)={c.p_yes:.2f}")
    elif kind == "anchor":
        how = "confirmed by the operator" if event.anchor.confirmed else "found by the MLLM"
        console.print(f"THI anchor: {event.anchor.image_id} ({how})")
    elif kind == "vqa":
        cached = " (cached)" if event.vqa.cached else ""
        console.print(f"THI answers{cached}: {' '.join(event.vqa.answers)}")
    elif kind == "refined_query":
        console.print(f"THI refined query: {event.refined_query.text}")


def print_trace(trace: Any) -> None:
    """One line per THI step: which candidates were asked, the anchor, the refined query."""
    asked = ", ".join(
        f"#{c.base_rank} {c.image_id} P(Yes)={c.p_yes:.2f}" for c in trace.candidates if c.asked
    )
    console.print(f"THI asked: {asked or 'nobody'} ({trace.mllm_calls} MLLM calls)")
    if trace.anchor_image_id:
        how = " (confirmed)" if trace.anchor_confirmed else ""
        console.print(
            f"THI anchor: {trace.anchor_image_id}{how}; refined query: {trace.refined_query}"
        )
    elif is_failure(trace.fallback_reason):
        console.print(f"THI fell back to the base ranking: {trace.fallback_reason}")
    else:  # the reason says which rule kept it ("no anchor: ...")
        console.print(f"THI kept the base ranking ({trace.fallback_reason})")


def search(
    text: Annotated[str, typer.Option("--text", "-t", help="Description of the person.")] = "",
    image: Annotated[
        Path | None,
        typer.Option(
            "--image", help="Query crop (JPEG/PNG/WebP/BMP): query by example, alone or with text."
        ),
    ] = None,
    image_weight: Annotated[
        float | None,
        typer.Option(help="With --text and --image: the crop's weight in [0, 1] (default 0.5)."),
    ] = None,
    anchor: Annotated[
        str | None,
        typer.Option(
            "--anchor", help="THI from this gallery image, confirmed as the target (implies --thi)."
        ),
    ] = None,
    stream: Annotated[
        bool, typer.Option("--stream", help="SearchStream: print each THI step as it arrives.")
    ] = False,
    group_tracks: Annotated[
        bool, typer.Option("--group-tracks", help="One hit per track id, with its hit count.")
    ] = False,
    top_k: Annotated[int, typer.Option("--top-k", "-k")] = 10,
    camera: Annotated[list[str] | None, typer.Option(help="Only this camera (repeatable).")] = None,
    since: Annotated[
        str | None, typer.Option(help="Captured at or after (ISO-8601, UTC if no zone).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Captured at or before (ISO-8601).")] = None,
    address: Annotated[
        str, typer.Option(envvar="ICL_ADDRESS", help="PersonSearch address.")
    ] = DEFAULT_ADDRESS,
    timeout: Annotated[float, typer.Option(help="Deadline in seconds.")] = 30.0,
    thi: Annotated[bool, typer.Option("--thi", help="Re-rank with THI (needs an mllm).")] = False,
    xi: Annotated[float | None, typer.Option(help="THI's xi (default 0.5).")] = None,
    lam: Annotated[float | None, typer.Option("--lambda", help="THI's lambda (0.8).")] = None,
    candidates: Annotated[int | None, typer.Option(help="THI's K (default 5).")] = None,
    token: TokenOption = None,
    tls: TlsFlag = False,
    ca_file: CaFileOption = None,
    cert_file: CertFileOption = None,
    key_file: KeyFileOption = None,
) -> None:
    """Search the gallery of a running PersonSearch service and print the ranked hits."""
    crop = b""
    if image is not None:
        try:
            crop = image.read_bytes()
        except OSError as exc:
            raise fail(f"--image {image}: {exc.strerror or exc}") from None
    thi = thi or anchor is not None
    request = search_request(
        text,
        top_k,
        camera or (),
        parse_time(since, "since"),
        parse_time(until, "until"),
        image=crop,
        image_weight=image_weight,
        group_by_track=group_tracks,
        confirmed_anchor=anchor or "",
    )
    if thi:
        request.thi.enabled = True
        if xi is not None:
            request.thi.xi = xi
        if lam is not None:
            setattr(request.thi, "lambda", lam)
        if candidates is not None:
            request.thi.candidates = candidates
    tls_opts = tls_options(tls, ca_file, cert_file, key_file)
    try:
        with PersonSearchClient(address, tls=tls_opts, token=token, timeout_s=timeout) as client:
            if stream:
                response = None
                for event in client.search_stream(request):
                    if event.HasField("result"):
                        response = event.result
                    else:
                        print_event(event)
                if response is None:
                    raise fail(f"the stream ended without a result ({address})")
            else:
                response = client.search(request)
    except grpc.RpcError as exc:
        raise fail(f"{exc.code().name}: {exc.details()} ({address})") from None
    title = text
    if image is not None:
        title = f"{text} + crop {image.name}" if text else f"crop {image.name}"
    print_hits(title, response, group_tracks)
    if thi:
        print_trace(response.thi_trace)


def register(app: typer.Typer) -> None:
    app.command()(search)
