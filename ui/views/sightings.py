"""Sightings: where and when the chosen person was seen, camera against time."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from icl_console import service
from icl_console.render import when

st.title("Sightings")

last = st.session_state.get("last_search")
if last is None or not last["response"].hits:
    st.info("Run a search first: its results are the candidate sightings.")
    st.stop()

hits = list(last["response"].hits)
request = last["request"]
confirmed = request.thi.confirmed_anchor_image_id
if confirmed:
    st.caption(f"The person confirmed as {confirmed}, and the results THI ranked with them.")
else:
    st.caption(f"From the search: {request.text or 'an example crop'}")
threshold = st.slider(
    "Keep results scoring at least",
    min_value=float(min(h.score for h in hits)),
    max_value=float(max(h.score for h in hits)),
    value=float(hits[min(4, len(hits) - 1)].score),
)
kept = [h for h in hits if h.score >= threshold]
frame = pd.DataFrame(
    {
        "time": [h.captured_at.ToDatetime() for h in kept],
        "camera": [h.camera_id for h in kept],
        "image": [h.image_id for h in kept],
        "score": [round(h.score, 3) for h in kept],
    }
).sort_values("time")
path = alt.Chart(frame).mark_line(color="#999").encode(x="time:T", y="camera:N", order="time:T")
points = (
    alt.Chart(frame)
    .mark_circle(size=160)
    .encode(
        x=alt.X("time:T", title="captured (UTC)"),
        y=alt.Y("camera:N", title="camera"),
        color=alt.Color("score:Q", scale=alt.Scale(scheme="blues")),
        tooltip=["image", "camera", "time:T", "score"],
    )
)
st.altair_chart(path + points, width="stretch")
st.dataframe(frame, hide_index=True, width="stretch")
strip = st.columns(min(len(kept), 8) or 1)
for column, hit in zip(
    strip, sorted(kept, key=lambda h: h.captured_at.ToMilliseconds()), strict=False
):
    crop = service.crop(hit.image_id)
    if crop:
        column.image(crop, caption=f"{hit.camera_id} {when(hit.captured_at)[11:16]}")
