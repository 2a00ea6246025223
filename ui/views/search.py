"""Search: a description (and filters) in, ranked crops out; with THI, its steps."""

from __future__ import annotations

from datetime import UTC, datetime, time

import streamlit as st

from icl_api import search_request
from icl_console import service
from icl_console.render import hit_grid, moves, trace_view

st.title("Search")

with st.form("search"):
    text = st.text_area("Description of the person", placeholder="A woman in a red coat ...")
    left, middle, right = st.columns(3)
    top_k = left.number_input("Results", min_value=1, max_value=100, value=10)
    cameras = middle.text_input("Cameras (comma-separated, empty: all)")
    use_time = right.checkbox("Only a time window")
    day = right.date_input("Day", value=None, disabled=False)
    t0, t1 = right.columns(2)
    start = t0.time_input("From", value=time(0, 0))
    end = t1.time_input("To", value=time(23, 59))
    thi = st.toggle("Re-rank with THI (the MLLM checks the top candidates)")
    k, xi, lam = st.columns(3)
    candidates = k.number_input("K (candidates checked)", min_value=1, max_value=50, value=5)
    xi_value = xi.number_input("xi (anchor threshold)", value=0.5, step=0.05, format="%.2f")
    lam_value = lam.number_input(
        "lambda (weight of the base ranking)", value=0.8, step=0.05, format="%.2f"
    )
    submitted = st.form_submit_button("Search", type="primary")

if submitted:
    camera_ids = [c.strip() for c in cameras.split(",") if c.strip()]
    since = until = None
    if use_time:
        if day is None:
            st.error("Pick a day for the time window.")
            st.stop()
        since = datetime.combine(day, start, tzinfo=UTC)
        until = datetime.combine(day, end, tzinfo=UTC)
        if until < since:
            st.error("The time window ends before it starts.")
            st.stop()
    request = search_request(text, int(top_k), camera_ids, since, until)
    if thi:
        request.thi.enabled = True
        request.thi.candidates = int(candidates)
        request.thi.xi = float(xi_value)
        setattr(request.thi, "lambda", float(lam_value))
    try:
        with st.spinner("searching"):
            response = service.call(service.client().search, request)
    except service.ServiceError as error:
        service.show_error(error)
        st.stop()
    st.session_state.last_search = {"text": text, "request": request, "response": response}

last = st.session_state.get("last_search")
if last is not None:
    response = last["response"]
    if not response.hits:
        st.warning("No results: the gallery holds nobody matching the filters.")
    else:
        thi_on = last["request"].thi.enabled
        trace = response.thi_trace
        moved = moves(response.hits, trace) if thi_on else None
        if thi_on:
            results, steps = st.columns([3, 2])
            with steps:
                trace_view(trace, response.hits)
        else:
            results = st.container()
        with results:
            st.subheader(f"{len(response.hits)} results")
            hit_grid(response.hits, lambda image_id: None, moved)
