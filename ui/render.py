"""Pieces the pages share: a grid of hits, a THI trace, time formatting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

import streamlit as st

COLUMNS = 5


def when(ts: Any) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def moves(hits: Sequence[Any], trace: Any) -> dict[str, int]:
    """How many places each hit moved against the base ranking (positive: up)."""
    base = {c.image_id: c.base_rank for c in trace.candidates}
    return {
        h.image_id: base[h.image_id] - rank for rank, h in enumerate(hits, 1) if h.image_id in base
    }


def arrow(move: int | None) -> str:
    if move is None:
        return "new"
    if move > 0:
        return f":green[▲{move}]"
    if move < 0:
        return f":red[▼{-move}]"
    return "="


def hit_grid(
    hits: Sequence[Any],
    crop: Callable[[str], bytes | None],
    moved: dict[str, int] | None = None,
    actions: Callable[[Any, int], None] | None = None,
    key: str = "hits",
) -> None:
    """Crops in rows of COLUMNS with rank, score, camera and time under each."""
    for start in range(0, len(hits), COLUMNS):
        columns = st.columns(COLUMNS)
        for column, (rank, hit) in zip(
            columns, enumerate(hits[start : start + COLUMNS], start + 1), strict=False
        ):
            with column, st.container(border=True):
                image = crop(hit.image_id)
                if image:
                    st.image(image, width="stretch")
                line = f"**#{rank}** · {hit.score:.3f}"
                if moved is not None:
                    line += f" · {arrow(moved.get(hit.image_id))}"
                st.markdown(line)
                st.caption(f"{hit.image_id} · {hit.camera_id} · {when(hit.captured_at)}")
                if actions is not None:
                    actions(hit, rank)


def trace_view(trace: Any, hits: Sequence[Any]) -> None:
    """The THI steps: candidates with P(Yes), the anchor, the answers, the refined query."""
    st.subheader("THI")
    asked = [c for c in trace.candidates if c.asked]
    if asked:
        st.markdown("**Candidates checked** (P(Yes) that the crop fits the description)")
        for c in trace.candidates:
            if not c.asked:
                continue
            star = " ← anchor" if c.image_id == trace.anchor_image_id else ""
            st.progress(
                min(max(c.p_yes, 0.0), 1.0),
                text=f"#{c.base_rank} {c.image_id}: {c.p_yes:.2f}{star}",
            )
    if trace.anchor_image_id:
        st.success(f"Anchor: {trace.anchor_image_id}", icon=":material/my_location:")
        if trace.vqa_answers:
            with st.expander(
                f"The {len(trace.vqa_answers)} answers about the anchor", expanded=False
            ):
                for answer in trace.vqa_answers:
                    st.markdown(f"- {answer}")
        if trace.refined_query:
            st.markdown(f"**Refined query:** {trace.refined_query}")
    elif trace.fallback_reason:
        st.info(f"THI kept the base ranking: {trace.fallback_reason}", icon=":material/info:")
    st.caption(f"{trace.mllm_calls} MLLM calls")
