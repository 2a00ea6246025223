"""The Gallery port in process memory: exact inner-product search with numpy.

For unit tests of the search, enrolment and THI logic and for small offline runs; it keeps
nothing across processes. Results follow the Milvus adapter's contract: hits in descending
score, ties in insertion order, filters on camera and capture time, upsert replaces a row and
its cached answers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import numpy as np

from icl.ports import GalleryEntry, GalleryFilter, GalleryHit, GalleryRecord, GalleryStats


class MemoryGallery:
    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._rows: dict[str, GalleryRecord] = {}
        self._vqa: dict[str, tuple[str, list[str]]] = {}

    def _matches(self, r: GalleryRecord, where: GalleryFilter) -> bool:
        return where.matches(r.camera_id, r.captured_at_ms)

    def upsert(self, records: Sequence[GalleryRecord]) -> None:
        for r in records:
            vector = np.asarray(r.embedding, dtype=np.float32)
            if vector.shape != (self.dim,) or not np.all(np.isfinite(vector)):
                raise ValueError(f"embedding of {r.image_id!r} is not {self.dim} finite floats")
            self._rows.pop(r.image_id, None)  # a replaced row moves to the end, as written
            self._rows[r.image_id] = replace(r, embedding=vector)
            self._vqa.pop(r.image_id, None)

    def search(
        self, vector: np.ndarray, top_k: int, where: GalleryFilter, vqa_model_key: str = ""
    ) -> list[GalleryHit]:
        rows = [r for r in self._rows.values() if self._matches(r, where)]
        if not rows:
            return []
        scores = np.stack([r.embedding for r in rows]) @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [
            GalleryHit(
                image_id=rows[i].image_id,
                camera_id=rows[i].camera_id,
                captured_at_ms=rows[i].captured_at_ms,
                track_id=rows[i].track_id,
                image_uri=rows[i].image_uri,
                score=float(scores[i]),
                vqa=self._answers(rows[i].image_id, vqa_model_key),
            )
            for i in order
        ]

    def _answers(self, image_id: str, model_key: str) -> tuple[str, ...] | None:
        key, answers = self._vqa.get(image_id, ("", []))
        return tuple(answers) if model_key and key == model_key else None

    def delete(self, image_ids: Sequence[str], where: GalleryFilter) -> list[str]:
        if image_ids:
            doomed = [i for i in image_ids if i in self._rows]
        else:
            doomed = [i for i, r in self._rows.items() if self._matches(r, where)]
        for image_id in doomed:
            del self._rows[image_id]
            self._vqa.pop(image_id, None)
        return doomed

    def unknown_cameras(self, camera_ids: Sequence[str]) -> list[str]:
        known = {r.camera_id for r in self._rows.values()}
        return [c for c in camera_ids if c not in known]

    def count(self) -> int:
        return len(self._rows)

    def fetch(self, image_ids: Sequence[str]) -> list[GalleryRecord]:
        return [self._rows[i] for i in image_ids if i in self._rows]

    def get_vqa(self, image_ids: Sequence[str], model_key: str) -> dict[str, list[str]]:
        out = {}
        for image_id in image_ids:
            key, answers = self._vqa.get(image_id, ("", []))
            if key == model_key:
                out[image_id] = list(answers)
        return out

    def put_vqa(self, answers: Mapping[str, list[str]], model_key: str) -> None:
        for image_id, values in answers.items():
            if image_id in self._rows:
                self._vqa[image_id] = (model_key, list(values))

    def list_page(self, where: GalleryFilter, after: str | None, limit: int) -> list[GalleryEntry]:
        ids = sorted(
            i
            for i, r in self._rows.items()
            if (after is None or i > after) and self._matches(r, where)
        )[:limit]
        return [_entry(self._rows[i]) for i in ids]

    def stats(self) -> GalleryStats:
        per_camera: dict[str, int] = {}
        for r in self._rows.values():
            per_camera[r.camera_id] = per_camera.get(r.camera_id, 0) + 1
        times = [r.captured_at_ms for r in self._rows.values()]
        return GalleryStats(
            len(self._rows), per_camera, min(times, default=None), max(times, default=None)
        )

    def reachable(self, timeout_s: float = 2.0) -> bool:
        return True

    def close(self) -> None:
        self._rows.clear()


def _entry(r: GalleryRecord) -> GalleryEntry:
    return GalleryEntry(r.image_id, r.camera_id, r.captured_at_ms, r.track_id, r.image_uri)
