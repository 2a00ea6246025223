"""The gallery in Milvus: one adapter for Milvus Lite (a local data dir) and a Milvus server.

Rows: image_id (the caller's id, primary key), camera_id, captured_at_ms, track_id,
image_uri, embedding (normalised; inner product = retrieval score). Filters are built only
from typed values that passed `validation`, and every string is quoted with json.dumps, so
no request value can change the meaning of an expression.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from icl.ports import GalleryFilter, GalleryHit, GalleryRecord

log = logging.getLogger(__name__)

OUTPUT_FIELDS = ["camera_id", "captured_at_ms", "track_id", "image_uri"]
HNSW = {"M": 16, "efConstruction": 200}
SEARCH_EF = 128
FILTERED_SEARCH_EF = 1024  # a filter that keeps ~10% of rows needs a wide beam for recall
QUERY_PAGE = 16384  # Milvus' largest query window


class GalleryError(RuntimeError):
    """The gallery cannot serve (schema mismatch, unreachable server, ...)."""


def is_local_uri(uri: str) -> bool:
    return "://" not in uri


def filter_expression(where: GalleryFilter) -> str:
    parts = []
    if where.camera_ids:
        parts.append(f"camera_id in {json.dumps(list(where.camera_ids))}")
    if where.start_ms is not None:
        parts.append(f"captured_at_ms >= {int(where.start_ms)}")
    if where.end_ms is not None:
        parts.append(f"captured_at_ms <= {int(where.end_ms)}")
    return " and ".join(parts)


class MilvusGallery:
    """Gallery adapter over pymilvus' MilvusClient. Calls are blocking; callers serialise."""

    def __init__(self, uri: str, dim: int, collection: str = "gallery", token: str = "") -> None:
        self.uri = uri
        self.dim = dim
        self.collection = collection
        if is_local_uri(uri):
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._client = MilvusClient(uri=uri, token=token) if token else MilvusClient(uri=uri)
            self._ensure_collection()
        except MilvusException as exc:
            # repr() of a MilvusException is empty and the token must never reach a log.
            raise GalleryError(f"Milvus at {self._safe_uri()}: {exc.code} {exc.message}") from None

    def _safe_uri(self) -> str:
        return self.uri.split("@")[-1] if "@" in self.uri else self.uri

    def _ensure_collection(self) -> None:
        c = self._client
        if c.has_collection(self.collection):
            fields = {f["name"]: f for f in c.describe_collection(self.collection)["fields"]}
            have = int(fields.get("embedding", {}).get("params", {}).get("dim", -1))
            if have != self.dim:
                raise GalleryError(
                    f"collection {self.collection!r} stores {have}-d embeddings but the encoder "
                    f"gives {self.dim}-d; use another collection or re-enrol the gallery"
                )
        else:
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("image_id", DataType.VARCHAR, is_primary=True, max_length=128)
            schema.add_field("camera_id", DataType.VARCHAR, max_length=64)
            schema.add_field("captured_at_ms", DataType.INT64)
            schema.add_field("track_id", DataType.VARCHAR, max_length=64)
            schema.add_field("image_uri", DataType.VARCHAR, max_length=1024)
            schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
            index = c.prepare_index_params()
            # Milvus Lite drops flat build params; pass them flat and nested (both accept it).
            index.add_index("embedding", index_type="HNSW", metric_type="IP", **HNSW, params=HNSW)
            c.create_collection(self.collection, schema=schema, index_params=index)
        c.load_collection(self.collection)  # collections come back released after a restart

    def upsert(self, records: Sequence[GalleryRecord]) -> None:
        if not records:
            return
        rows = []
        for r in records:
            vec = np.asarray(r.embedding, dtype=np.float32)
            if vec.shape != (self.dim,) or not np.all(np.isfinite(vec)):
                raise GalleryError(
                    f"embedding of {r.image_id!r} is not a finite {self.dim}-d vector"
                )
            rows.append(
                {
                    "image_id": r.image_id,
                    "camera_id": r.camera_id,
                    "captured_at_ms": int(r.captured_at_ms),
                    "track_id": r.track_id,
                    "image_uri": r.image_uri,
                    "embedding": vec.tolist(),
                }
            )
        self._client.upsert(self.collection, rows)  # upsert, never insert: ids are idempotent

    def search(self, vector: np.ndarray, top_k: int, where: GalleryFilter) -> list[GalleryHit]:
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape != (self.dim,) or not np.all(np.isfinite(vec)):
            raise GalleryError(f"query is not a finite {self.dim}-d vector")
        ef = max(top_k, SEARCH_EF if where.empty else FILTERED_SEARCH_EF)
        result = self._client.search(
            self.collection,
            data=[vec.tolist()],
            limit=top_k,
            filter=filter_expression(where),
            output_fields=OUTPUT_FIELDS,
            search_params={"metric_type": "IP", "params": {"ef": ef}},
        )
        hits = []
        for hit in result[0]:
            e = hit["entity"]
            hits.append(
                GalleryHit(
                    image_id=str(hit.id),
                    camera_id=e["camera_id"],
                    captured_at_ms=int(e["captured_at_ms"]),
                    track_id=e["track_id"],
                    image_uri=e["image_uri"],
                    score=float(hit.distance),
                )
            )
        return hits

    def _ids_matching(self, expression: str) -> list[str]:
        ids: list[str] = []
        while True:
            page = self._client.query(
                self.collection,
                filter=expression,
                output_fields=["image_id"],
                limit=QUERY_PAGE,
                offset=len(ids),
            )
            ids.extend(str(row["image_id"]) for row in page)
            if len(page) < QUERY_PAGE:
                return ids

    def delete(self, image_ids: Sequence[str], where: GalleryFilter) -> int:
        """Delete the listed ids, or every row matching `where`; returns rows removed."""
        if image_ids:
            expression = f"image_id in {json.dumps(list(image_ids))}"
            if not where.empty:
                expression += " and " + filter_expression(where)
        elif not where.empty:
            expression = filter_expression(where)
        else:
            raise ValueError("refusing to delete with neither ids nor a filter")
        # Count what exists first: Lite echoes the requested ids, whether or not they existed.
        existing = self._ids_matching(expression)
        for start in range(0, len(existing), QUERY_PAGE):
            self._client.delete(self.collection, ids=existing[start : start + QUERY_PAGE])
        return len(existing)

    def unknown_cameras(self, camera_ids: Sequence[str]) -> list[str]:
        unknown = []
        for camera in dict.fromkeys(camera_ids):
            rows = self._client.query(
                self.collection,
                filter=f"camera_id == {json.dumps(camera)}",
                output_fields=["image_id"],
                limit=1,
            )
            if not rows:
                unknown.append(camera)
        return unknown

    def count(self) -> int:
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    def close(self) -> None:
        self._client.close()
