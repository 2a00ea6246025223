"""Gallery: browse by camera and time with paging, open an image, enrol crops by upload (a
result per crop), delete images with a confirmation."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import PurePath

import streamlit as st

from icl_api import gallery_image, list_images_request, pb
from icl_console import service
from icl_console.render import when

st.title("Gallery")

browse, enrol, remove = st.tabs(["Browse", "Enrol crops", "Delete"])

with browse:
    stats: pb.GalleryStats | None
    try:
        stats = service.call(service.client().gallery_stats)
    except service.ServiceError as error:
        service.show_error(error)
        stats = None
    if stats is not None:
        span = (
            f"; captured {when(stats.oldest_captured_at)} to {when(stats.newest_captured_at)}"
            if stats.images
            else ""
        )
        st.caption(f"{stats.images} images from {len(stats.cameras)} cameras{span}")
        left, middle, right = st.columns(3)
        cameras = left.multiselect(
            "Cameras (none: all)", sorted(c.camera_id for c in stats.cameras)
        )
        page_size = middle.selectbox("Per page", [20, 50, 100], index=0)
        window = right.date_input("Captured on (optional)", value=None, key="browse_day")
        since = datetime.combine(window, time(0, 0), tzinfo=UTC) if window else None
        until = datetime.combine(window, time(23, 59, 59), tzinfo=UTC) if window else None
        # A filter change starts again from the first page; the tokens walk forward only.
        query = (tuple(cameras), page_size, window)
        if st.session_state.get("browse_query") != query:
            st.session_state.browse_query = query
            st.session_state.browse_tokens = [""]
        tokens: list[str] = st.session_state.browse_tokens
        request = list_images_request(page_size, cameras, since, until, page_token=tokens[-1])
        try:
            page = service.call(service.client().list_images, request)
        except service.ServiceError as error:
            service.show_error(error)
        else:
            st.markdown(f"Page {len(tokens)}: {len(page.images)} images")
            rows = [
                {
                    "image id": i.image_id,
                    "camera": i.camera_id,
                    "captured (UTC)": when(i.captured_at),
                    "track": i.track_id,
                }
                for i in page.images
            ]
            st.dataframe(rows, hide_index=True, width="stretch")
            back, forward = st.columns(2)
            if back.button("First page", disabled=len(tokens) == 1):
                st.session_state.browse_tokens = [""]
                st.rerun()
            if forward.button("Next page", disabled=not page.next_page_token):
                tokens.append(page.next_page_token)
                st.rerun()
            ids = [i.image_id for i in page.images]
            chosen = st.selectbox("Open an image", ids, index=None) if ids else None
            if chosen:
                try:
                    image = service.call(service.client().get_image, chosen)
                except service.ServiceError as error:
                    service.show_error(error)
                else:
                    picture, facts = st.columns([1, 3])
                    if image.image:
                        picture.image(image.image)
                    facts.markdown(
                        f"**{image.image_id}**  \ncamera {image.camera_id} · "
                        f"{when(image.captured_at)} · track {image.track_id or '-'}"
                        + (f"  \n{image.image_uri}" if image.image_uri else "")
                    )

with enrol, st.form("enrol", clear_on_submit=False):
    files = st.file_uploader(
        "Crops (PNG or JPEG, one person each)",
        type=["png", "jpg", "jpeg"],
        accept_multiple_files=True,
    )
    left, middle, right = st.columns(3)
    camera = left.text_input("Camera id")
    day = middle.date_input("Captured on", value=datetime.now(UTC).date())
    at = right.time_input("at (UTC)", value=time(12, 0))
    track = st.text_input("Track id (optional)")
    if st.form_submit_button("Enrol", type="primary"):
        if not files:
            st.error("Choose at least one crop.")
        elif not camera.strip():
            st.error("Say which camera the crops come from.")
        else:
            captured = datetime.combine(day, at, tzinfo=UTC)
            items = [
                gallery_image(
                    image_id=f"{camera.strip()}-{PurePath(f.name).stem}",
                    camera_id=camera.strip(),
                    captured_at=captured,
                    image=f.getvalue(),
                    track_id=track.strip(),
                )
                for f in files
            ]
            try:
                responses = service.call(
                    lambda: list(service.client().enroll(items, batch_size=32))
                )
            except service.ServiceError as error:
                service.show_error(error)
            else:
                rows = [
                    {
                        "image id": r.image_id,
                        "result": pb.EnrollResult.Status.Name(r.status).lower(),
                        "reason": r.reason,
                    }
                    for response in responses
                    for r in response.results
                ]
                accepted = sum(r["result"] == "accepted" for r in rows)
                (st.success if accepted == len(rows) else st.warning)(
                    f"{accepted} of {len(rows)} crops enrolled."
                )
                st.dataframe(rows, hide_index=True, width="stretch")

with remove:
    ids_text = st.text_area(
        "Image ids to delete (one per line or comma-separated)", key="delete_ids"
    )
    ids = [i.strip() for i in ids_text.replace(",", "\n").splitlines() if i.strip()]
    if st.button("Delete…", disabled=not ids):
        st.session_state.confirm_delete = ids
    pending = st.session_state.get("confirm_delete")
    if pending:
        st.warning(
            f"Delete {len(pending)} image(s) for good? {', '.join(pending[:10])}"
            + (" …" if len(pending) > 10 else "")
        )
        yes, no = st.columns(2)
        if yes.button("Yes, delete", type="primary"):
            st.session_state.confirm_delete = None
            try:
                deleted = service.call(service.client().delete, image_ids=pending).deleted
            except service.ServiceError as error:
                service.show_error(error)
            else:
                st.success(f"Deleted {deleted} of {len(pending)} image(s).")
        if no.button("Cancel"):
            st.session_state.confirm_delete = None
            st.rerun()
