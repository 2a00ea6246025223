"""Gallery: enrol crops by upload (a result per crop), delete images with a confirmation."""

from __future__ import annotations

from datetime import UTC, datetime, time
from pathlib import PurePath

import streamlit as st

from icl_api import gallery_image, pb
from icl_console import service

st.title("Gallery")

enrol, remove = st.tabs(["Enrol crops", "Delete"])

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
