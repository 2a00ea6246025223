"""Search: a description, an example crop or both (and filters) in, ranked crops out; with THI,
its steps as they stream. Any result can be confirmed as the person (THI runs from that anchor)
or used as the example crop of a new search."""

from __future__ import annotations

from datetime import UTC, datetime, time
from typing import Any

import grpc
import streamlit as st

from icl_api import pb, search_request
from icl_console import service
from icl_console.render import StepsView, hit_grid, moves

st.title("Search")


def _cameras() -> list[str]:
    try:
        stats = service.call(service.client().gallery_stats)
    except service.ServiceError:
        return []
    return sorted(c.camera_id for c in stats.cameras)


with st.form("search"):
    text = st.text_area("Description of the person", placeholder="A woman in a red coat ...")
    example = st.file_uploader(
        "Example crop (optional: search by image)", type=["png", "jpg", "jpeg"]
    )
    weight = st.slider("Weight of the crop when both are given", 0.0, 1.0, 0.5, 0.05)
    left, middle, right = st.columns(3)
    top_k = left.number_input("Results", min_value=1, max_value=100, value=10)
    group = left.checkbox("One result per track")
    known = _cameras()
    if known:
        cameras = middle.multiselect("Cameras (none: all)", known)
    else:
        typed = middle.text_input("Cameras (comma-separated, empty: all)")
        cameras = [c.strip() for c in typed.split(",") if c.strip()]
    use_time = right.checkbox("Only a time window")
    day = right.date_input("Day", value=None)
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


def _request() -> pb.SearchRequest | None:
    since = until = None
    if use_time:
        if day is None:
            st.error("Pick a day for the time window.")
            return None
        since = datetime.combine(day, start, tzinfo=UTC)
        until = datetime.combine(day, end, tzinfo=UTC)
        if until < since:
            st.error("The time window ends before it starts.")
            return None
    image = example.getvalue() if example is not None else b""
    request = search_request(
        text,
        int(top_k),
        cameras,
        since,
        until,
        image=image,
        image_weight=float(weight) if image and text.strip() else None,
        group_by_track=group,
    )
    if thi:
        request.thi.enabled = True
        request.thi.candidates = int(candidates)
        request.thi.xi = float(xi_value)
        setattr(request.thi, "lambda", float(lam_value))
    return request


def _describe(request: pb.SearchRequest) -> str:
    if request.text and request.image:
        return f"{request.text} (and an example crop)"
    return request.text or "an example crop"


def _run(request: pb.SearchRequest, results: Any, steps: StepsView | None) -> dict | None:
    """One search; with THI through SearchStream, drawing each step as it comes."""
    client = service.client()
    try:
        if not request.thi.enabled:
            with results, st.spinner("searching"):
                response = service.call(client.search, request)
            return {"request": request, "response": response, "base": list(response.hits)}
        assert steps is not None
        base: list[Any] = []
        result: pb.SearchResponse | None = None
        anchor = ""
        for event in client.search_stream(request):
            kind = event.WhichOneof("event")
            if kind == "base":
                base = list(event.base.hits)
                with results.container():
                    st.caption("Base ranking; THI is checking the candidates …")
                    hit_grid(base, service.crop)
            elif kind == "candidate":
                steps.candidate(event.candidate, anchor)
            elif kind == "anchor":
                anchor = event.anchor.image_id
                steps.anchor(anchor, event.anchor.confirmed)
            elif kind == "vqa":
                steps.answers(event.vqa.answers)
            elif kind == "refined_query":
                steps.refined(event.refined_query.text)
            elif kind == "result":
                result = event.result
                steps.finish(result.thi_trace)
    except service.ServiceError as error:
        service.show_error(error)
        return None
    except grpc.RpcError as exc:  # the stream failed, before its first event or mid-way
        service.show_error(service.explain(exc))
        return None
    if result is None:
        st.error("The service ended the search without a result.")
        return None
    return {"request": request, "response": result, "base": base}


def _actions(hit: Any, rank: int) -> None:
    st.button(
        "This is the person",
        key=f"confirm-{hit.image_id}",
        on_click=lambda: st.session_state.update(action=("confirm", hit.image_id)),
        help="THI from this crop: the MLLM describes it and the query is refined from it.",
        width="stretch",
    )
    st.button(
        "Search with this crop",
        key=f"example-{hit.image_id}",
        on_click=lambda: st.session_state.update(action=("example", hit.image_id)),
        width="stretch",
    )


def _layout(thi_on: bool) -> tuple[Any, StepsView | None]:
    if not thi_on:
        return st.empty(), None
    results, steps = st.columns([3, 2])
    return results.empty(), StepsView(steps)


def _show(state: dict, results: Any, steps: StepsView | None, fresh: bool) -> None:
    response = state["response"]
    if not fresh and steps is not None:
        steps.replay(response.thi_trace)
    with results.container():
        if not response.hits:
            st.warning("No results: the gallery holds nobody matching the filters.")
            return
        st.subheader(f"{len(response.hits)} results for: {_describe(state['request'])}")
        moved = moves(response.hits, state["base"]) if state["request"].thi.enabled else None
        anchor = response.thi_trace.anchor_image_id
        hit_grid(response.hits, service.crop, moved, _actions, highlight=anchor)


# What to run now: the form, or a result's button (confirm it, or search with its crop).
action = st.session_state.pop("action", None)
request: pb.SearchRequest | None = None
before: dict | None = None
if submitted:
    request = _request()
    st.session_state.pop("confirmed", None)
elif action is not None and "last_search" in st.session_state:
    what, image_id = action
    last = st.session_state.last_search
    if what == "confirm":
        request = pb.SearchRequest()
        request.CopyFrom(last["request"])
        request.thi.enabled = True
        request.thi.confirmed_anchor_image_id = image_id
        before = last
    else:
        crop = service.crop(image_id)
        if crop is None:
            st.error(f"The crop of {image_id} is no longer in the gallery.")
        else:
            request = search_request(image=crop, top_k=last["request"].top_k)

if request is not None:
    if before is not None:
        st.info(
            f"You confirmed {request.thi.confirmed_anchor_image_id} as the person: THI runs "
            "from it (no MLLM walk over the candidates).",
            icon=":material/how_to_reg:",
        )
    results, steps = _layout(request.thi.enabled)
    state = _run(request, results, steps)
    if state is not None:
        if before is not None:
            state["base"] = list(before["response"].hits)  # moves against the old ranking
            state["before"] = before
        st.session_state.last_search = state
        _show(state, results, steps, fresh=True)
elif "last_search" in st.session_state:
    state = st.session_state.last_search
    results, steps = _layout(state["request"].thi.enabled)
    _show(state, results, steps, fresh=False)

state = st.session_state.get("last_search")
if state is not None and state.get("before") is not None:
    with st.expander("The ranking before the confirmation", expanded=True):
        old = state["before"]["response"].hits
        st.dataframe(
            [
                {"rank": r, "image": h.image_id, "camera": h.camera_id, "score": round(h.score, 3)}
                for r, h in enumerate(old, 1)
            ],
            hide_index=True,
        )
