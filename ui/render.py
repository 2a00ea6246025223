"""Pieces the pages share: a grid of hits, the THI steps, time formatting."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

import streamlit as st

COLUMNS = 5


def when(ts: Any) -> str:
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def moves(hits: Sequence[Any], base: Sequence[Any]) -> dict[str, int]:
    """How many places each hit moved against the base ranking (positive: up)."""
    before = {h.image_id: rank for rank, h in enumerate(base, 1)}
    return {
        h.image_id: before[h.image_id] - rank
        for rank, h in enumerate(hits, 1)
        if h.image_id in before
    }


def arrow(move: int | None) -> str:
    if move is None:
        return ":blue[new]"
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
    highlight: str = "",
) -> None:
    """Crops in rows of COLUMNS with rank, score, camera and time under each."""
    for start in range(0, len(hits), COLUMNS):
        columns = st.columns(COLUMNS)
        row = enumerate(hits[start : start + COLUMNS], start + 1)
        for column, (rank, hit) in zip(columns, row, strict=False):
            with column, st.container(border=True):
                image = crop(hit.image_id)
                if image:
                    st.image(image, width="stretch")
                line = f"**#{rank}** · {hit.score:.3f}"
                if moved is not None:
                    line += f" · {arrow(moved.get(hit.image_id))}"
                if hit.image_id == highlight:
                    line += " · :orange[anchor]"
                st.markdown(line)
                track = f" · track {hit.track_id} ({hit.track_hits})" if hit.track_hits else ""
                st.caption(f"{hit.image_id} · {hit.camera_id} · {when(hit.captured_at)}{track}")
                if actions is not None:
                    actions(hit, rank)


class StepsView:
    """The THI steps, drawn as they arrive (SearchStream) or from a finished trace."""

    def __init__(self, container: Any) -> None:
        self.box = container
        with self.box:
            st.subheader("THI")
            self.candidates = st.container()
            self.outcome = st.container()

    def candidate(self, c: Any, anchor: str = "") -> None:
        if not c.asked:
            return
        with self.candidates:
            if not getattr(self, "_titled", False):
                st.markdown("**Candidates checked** (P(Yes) that the crop fits the description)")
                self._titled = True
            star = " ← anchor" if c.image_id == anchor else ""
            st.progress(
                min(max(c.p_yes, 0.0), 1.0),
                text=f"#{c.base_rank} {c.image_id}: {c.p_yes:.2f}{star}",
            )

    def anchor(self, image_id: str, confirmed: bool) -> None:
        who = "confirmed by the operator" if confirmed else "found by the MLLM"
        with self.outcome:
            st.success(f"Anchor: {image_id} ({who})", icon=":material/my_location:")

    def answers(self, answers: Sequence[str]) -> None:
        with self.outcome, st.expander(f"The {len(answers)} answers about the anchor"):
            for answer in answers:
                st.markdown(f"- {answer}")

    def refined(self, text: str) -> None:
        with self.outcome:
            st.markdown(f"**Refined query:** {text}")

    def finish(self, trace: Any) -> None:
        with self.outcome:
            if not trace.anchor_image_id and trace.fallback_reason:
                st.info(
                    f"THI kept the base ranking: {trace.fallback_reason}", icon=":material/info:"
                )
            st.caption(f"{trace.mllm_calls} MLLM calls")

    def replay(self, trace: Any) -> None:
        """Everything from a finished trace (a page rerun)."""
        for c in trace.candidates:
            self.candidate(c, trace.anchor_image_id)
        if trace.anchor_image_id:
            self.anchor(trace.anchor_image_id, trace.anchor_confirmed)
            if trace.vqa_answers:
                self.answers(trace.vqa_answers)
            if trace.refined_query:
                self.refined(trace.refined_query)
        self.finish(trace)
