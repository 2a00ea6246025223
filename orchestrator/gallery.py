"""The gallery in Milvus: one adapter for Milvus Lite (a local data dir) and a Milvus server.

Rows (docs/gallery.md): image_id (the caller's id, primary key), camera_id, captured_at_ms,
track_id, image_uri, vqa (cached MLLM answers as JSON, keyed by model), embedding (one
L2-normalised vector whose inner product is the ICL score). Filters are built only from
typed values that match the strict patterns in `validation`, and every string is quoted
with json.dumps, so no request value can change the meaning of an expression.

The adapter hides what differs between Milvus Lite 3.x and a Milvus 2.3+ server
(measured in docs/gallery.md): index params sent flat and nested, upsert only (duplicate
keys behave differently), explicit output fields, load at start, Session consistency for
read-your-writes, counts by query, delete counts taken before deleting, vector checks,
and Lite's MemTable: rows it has not flushed are searched by a Python loop that converts each
vector (about 0.1 ms per row, 1.2 s per search at 10k rows), so on Lite the adapter flushes
written rows into an HNSW-indexed segment before the next search (docs/gallery.md).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import grpc
import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException
from pymilvus.client.types import LoadState

from icl.orchestrator.validation import CAMERA_ID, IMAGE_ID, MAX_CAMERA_IDS, MAX_IDS_PER_DELETE
from icl.ports import GalleryEntry, GalleryFilter, GalleryHit, GalleryRecord, GalleryStats

log = logging.getLogger(__name__)

# FLAT (exact search), not HNSW: an HNSW graph does not keep every row reachable. With many
# equal vectors (a blank frame, a person standing still) faiss' HNSW in Milvus Lite 3.2.2
# left rows with no path from the entry point, so no ef found them: 1,152 identical vectors
# beside 300 distinct ones left all 300 unreachable. On the 2.3.5 server the graph survived
# the duplicates, but once they were deleted 161 of the 300 were unreachable (deleted rows
# stay in the graph, masked). Both are rebuilt only by compaction, if ever. Exact search
# has no graph to lose rows in; what it costs is in docs/gallery.md.
INDEX_TYPE = "FLAT"
EXACT_INDEX_TYPES = ("FLAT",)
HNSW = {"M": 16, "efConstruction": 200}  # kept for tools that still build HNSW collections
# IP, not COSINE: vectors are stored L2-normalised and their inner product *is* the ICL
# score (BGE and TSE halves each scaled by 1/sqrt(2)); COSINE would renormalise every
# vector on every call for the same ranking.
METRIC = "IP"
# ef: the HNSW beam, used only for collections still on HNSW (FLAT ignores it; kept so
# `icl serve --search-ef` keeps working and benchmarks/gallery.py can sweep it).
SEARCH_EF = 512
FILTERED_SEARCH_EF = 1024
MAX_EF = 32768  # Milvus' HNSW limit
# Session: a client reads its own upserts (an acknowledged Enroll is searchable at once)
# without Strong's wait for the next time tick (200 ms per call on a 2.3 server). Session
# does not cover deletes on 2.3.5, so reads go Strong for a moment after one.
# Lite is always strongly consistent.
CONSISTENCY = "Session"
STRONG_AFTER_DELETE_S = 1.0
QUERY_PAGE = 16384  # Milvus' largest query window
VQA_MAX_CHARS = 65535  # VARCHAR's maximum; answers of a few MLLM versions fit easily
MAX_MODEL_KEY_CHARS = 256
NORM_TOLERANCE = 1e-3
# Milvus Lite keeps up to 128 MB (about 60k 512-d rows) in its MemTable before it flushes by
# itself, and searches, filtered queries and counts walk every MemTable row in Python. A flush
# costs about 15 ms for a 64-row batch (the HNSW build runs in Lite's background thread), so
# the adapter flushes lazily: before the next read that walks the MemTable, and whenever this
# many rows are pending (bounds a flush and the first search after a bulk load).
LITE_FLUSH_ROWS = 2048
# Milvus Lite serves pymilvus through a gRPC server in this process that allows no keepalive
# ping on an idle connection; pymilvus pings every 10 s, so an idle orchestrator got a GOAWAY
# (too_many_pings), logged by gRPC as an error, every minute or two. A loopback channel needs
# no keepalive.
LITE_GRPC_OPTIONS = {"grpc.keepalive_time_ms": 2**31 - 1, "grpc.keepalive_permit_without_calls": 0}
# Past about this many rows Milvus Lite's exact searches slow down (about 20 ms at 10k rows and
# 200 ms at 100k here: a Python walk and a copy of every vector per search; docs/PERFORMANCE.md):
# the adapter says once that a server is the better home.
LITE_ADVISED_MAX_ROWS = 10_000
KNOWN_CAMERA_TTL_S = 30.0  # how long a camera known to have rows is not queried again

SCHEMA_FIELDS = {
    "image_id": DataType.VARCHAR,
    "camera_id": DataType.VARCHAR,
    "captured_at_ms": DataType.INT64,
    "track_id": DataType.VARCHAR,
    "image_uri": DataType.VARCHAR,
    "vqa": DataType.VARCHAR,
    "embedding": DataType.FLOAT_VECTOR,
}
META_FIELDS = ["camera_id", "captured_at_ms", "track_id", "image_uri"]
OUTPUT_FIELDS = META_FIELDS  # kept for callers of the first version


class GalleryError(RuntimeError):
    """The gallery cannot serve (schema mismatch, unreachable server, bad vector, ...)."""


# A Milvus that accepts connections but does not answer (a server shutting down, a stalled
# network) must not hold a caller past its deadline, nor the service's one gallery thread for
# ever: pymilvus waits without limit when given no timeout. So every Milvus call is bounded by
# the deadline of the request it serves (bind_deadline), less a reserve for answering, and by
# CALL_TIMEOUT_S; a call whose request has no time left is not sent at all.
CALL_TIMEOUT_S = 30.0
ANSWER_RESERVE_S = 0.2
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "milvus_deadline", default=None
)


def bind_deadline(remaining_s: float | None) -> None:
    """Milvus calls made from this context (and from tasks and threads that copy it) end
    within `remaining_s` from now; None: within CALL_TIMEOUT_S."""
    _deadline.set(None if remaining_s is None else time.monotonic() + remaining_s)


def call_timeout() -> float:
    """Seconds the next Milvus call may take in this context."""
    deadline = _deadline.get()
    if deadline is None:
        return CALL_TIMEOUT_S
    left = deadline - time.monotonic()
    left -= min(ANSWER_RESERVE_S, left / 4)
    if left <= 0.001:
        raise GalleryError("no time is left of the request's deadline for Milvus")
    return min(CALL_TIMEOUT_S, left)


# What pymilvus raises when Milvus fails or cannot be reached: its error_handler re-raises
# gRPC errors and timeouts as they are and wraps the rest in MilvusException.
MILVUS_ERRORS = (MilvusException, grpc.RpcError, grpc.FutureTimeoutError)
P = ParamSpec("P")
R = TypeVar("R")


def describe_milvus_error(exc: BaseException) -> str:
    """Code and message: repr() of a MilvusException is empty. Never holds the token."""
    if isinstance(exc, MilvusException):
        return f"{exc.code} {exc.message}"
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name} {exc.details()}"
    return type(exc).__name__


def _milvus_call(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn a Milvus failure inside the decorated method into one GalleryError (the service
    answers UNAVAILABLE), logged once with its code and message."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except MILVUS_ERRORS as exc:
                gallery = cast("MilvusGallery", args[0])
                detail = describe_milvus_error(exc)
                # pymilvus' channel redials by itself: calls succeed again once Milvus is
                # back (tests/test_gallery_outage.py), so nothing is reopened here.
                log.warning("Milvus %s failed (%s): %s", what, gallery._safe_uri(), detail)
                raise GalleryError(f"{what} failed: {detail}") from None

        return call

    return wrap


def is_local_uri(uri: str) -> bool:
    return "://" not in uri


def _quoted(values: Sequence[str], pattern: Any, what: str) -> str:
    """A Milvus list literal of strings that all match `pattern` (defence in depth)."""
    for value in values:
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise ValueError(f"{what} {str(value)[:40]!r} must match {pattern.pattern}")
    return json.dumps(list(values))


def filter_expression(where: GalleryFilter) -> str:
    """The Milvus boolean expression for typed filter fields ("" when unfiltered)."""
    parts = []
    if where.camera_ids:
        if len(where.camera_ids) > MAX_CAMERA_IDS:
            raise ValueError(f"{len(where.camera_ids)} camera ids; at most {MAX_CAMERA_IDS}")
        parts.append(f"camera_id in {_quoted(where.camera_ids, CAMERA_ID, 'camera id')}")
    if where.start_ms is not None:
        parts.append(f"captured_at_ms >= {int(where.start_ms)}")
    if where.end_ms is not None:
        parts.append(f"captured_at_ms <= {int(where.end_ms)}")
    return " and ".join(parts)


def ids_expression(image_ids: Sequence[str]) -> str:
    return f"image_id in {_quoted(image_ids, IMAGE_ID, 'image id')}"


class MilvusGallery:
    """Gallery adapter over pymilvus' MilvusClient. Calls are blocking; callers serialise."""

    def __init__(
        self,
        uri: str,
        dim: int | None,
        collection: str = "gallery",
        token: str = "",
        *,
        search_ef: int = SEARCH_EF,
        filtered_search_ef: int = FILTERED_SEARCH_EF,
        inspect_only: bool = False,
    ) -> None:
        """Open (or create) `collection`. `inspect_only` (for `icl gallery verify`): open an
        existing collection as it is, with the width it has (`dim` None): nothing created or
        rebuilt."""
        for name, ef in (("search_ef", search_ef), ("filtered_search_ef", filtered_search_ef)):
            if not 1 <= ef <= MAX_EF:
                raise GalleryError(f"{name} must be 1 to {MAX_EF}, not {ef}")
        self.uri = uri
        self.dim = dim
        self.collection = collection
        self.local = is_local_uri(uri)
        self.inspect_only = inspect_only
        self._strong_until = 0.0
        self._pending = 0  # rows written to Lite's MemTable since the last flush
        self._known_cameras: dict[str, float] = {}  # camera id -> monotonic expiry
        self._lite_rows = 0  # Lite: rows at open plus rows upserted since (an upper bound)
        self._advised = False
        self.search_ef = search_ef  # HNSW beam widths (benchmarks/gallery.py sweeps them)
        self.filtered_search_ef = filtered_search_ef
        if self.local:
            Path(uri).parent.mkdir(parents=True, exist_ok=True)
        try:
            options: dict[str, Any] = {"grpc_options": LITE_GRPC_OPTIONS} if self.local else {}
            if token:
                options["token"] = token
            self._client = MilvusClient(uri=uri, **options)
            self._ensure_collection()
        except MILVUS_ERRORS as exc:
            # The token must never reach a log or a message.
            detail = describe_milvus_error(exc)
            raise GalleryError(f"Milvus at {self._safe_uri()}: {detail}") from None

    def _consistency(self) -> str:
        return "Strong" if time.monotonic() < self._strong_until else CONSISTENCY

    def _safe_uri(self) -> str:
        return self.uri.split("@")[-1] if "@" in self.uri else self.uri

    def _ensure_collection(self) -> None:
        c = self._client
        if c.has_collection(self.collection):
            self._check_schema(c.describe_collection(self.collection)["fields"])
        elif self.inspect_only:
            raise GalleryError(f"no collection {self.collection!r} at {self._safe_uri()}")
        else:
            schema = c.create_schema(auto_id=False, enable_dynamic_field=False)
            schema.add_field("image_id", DataType.VARCHAR, is_primary=True, max_length=128)
            # Real fields, not dynamic ones: filters on dynamic fields are many times slower.
            # No partition key on camera_id: Milvus 2.3.5 returned no hits for filtered
            # searches on a partition-key collection (docs/gallery.md); a wide ef keeps
            # filtered recall instead.
            schema.add_field("camera_id", DataType.VARCHAR, max_length=64)
            schema.add_field("captured_at_ms", DataType.INT64)
            schema.add_field("track_id", DataType.VARCHAR, max_length=64)
            schema.add_field("image_uri", DataType.VARCHAR, max_length=1024)
            schema.add_field("vqa", DataType.VARCHAR, max_length=VQA_MAX_CHARS)
            schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=self.dim)
            c.create_collection(
                self.collection,
                schema=schema,
                index_params=self._index_params(),
                consistency_level=CONSISTENCY,
            )
        if not self.inspect_only:
            self._ensure_exact_index()
        c.load_collection(self.collection)  # collections come back released after a restart
        if self.local:
            # Rows replayed from Lite's write-ahead log after a crash sit in the MemTable.
            self._pending = 1
            self._flush_pending()
            self._lite_rows = self.count()
            self._advise_server()

    def _index_params(self) -> Any:
        index = self._client.prepare_index_params()
        index.add_index("embedding", index_type=INDEX_TYPE, metric_type=METRIC)
        return index

    def _ensure_exact_index(self) -> None:
        """Move a collection made by an earlier version (HNSW) onto exact search.

        Its graph may already have lost rows (see INDEX_TYPE); dropping the index and
        building FLAT makes every row searchable again. Lite builds FLAT instantly (it keeps
        the vectors); a server rebuilds its sealed segments in the background and searches
        them by brute force meanwhile.
        """
        c = self._client
        for name in c.list_indexes(self.collection, field_name="embedding"):
            index_type = str(c.describe_index(self.collection, name).get("index_type", ""))
            if index_type.upper() in EXACT_INDEX_TYPES:
                return
            log.warning(
                "collection %r has a %s index, which can leave rows unreachable by search; "
                "rebuilding it as %s (exact search)",
                self.collection,
                index_type,
                INDEX_TYPE,
            )
            c.release_collection(self.collection)
            c.drop_index(self.collection, name)
        c.create_index(self.collection, self._index_params())

    def _advise_server(self) -> None:
        """Log once when a Lite gallery has grown past LITE_ADVISED_MAX_ROWS."""
        if self._advised or self._lite_rows <= LITE_ADVISED_MAX_ROWS:
            return
        self._lite_rows = self.count()  # upserts of existing ids were counted as new rows
        if self._lite_rows > LITE_ADVISED_MAX_ROWS:
            self._advised = True
            log.warning(
                "the gallery holds %d images in Milvus Lite; past about %d, serve it from a "
                "Milvus server (--milvus-uri http://HOST:19530) for faster searches "
                "(docs/gallery.md)",
                self._lite_rows,
                LITE_ADVISED_MAX_ROWS,
            )

    def _flush_pending(self, at_least: int = 1) -> None:
        """Lite: move pending MemTable rows into an indexed segment (see LITE_FLUSH_ROWS).

        Not on a server: its growing segments are searched in C++, and every flush there
        seals a small segment.
        """
        if not self.local or self._pending < at_least:
            return
        self._client.flush(self.collection, timeout=call_timeout())
        self._pending = 0

    def _check_schema(self, fields: list[dict[str, Any]]) -> None:
        by_name = {f["name"]: f for f in fields}
        missing = [n for n in SCHEMA_FIELDS if n not in by_name]
        wrong = [n for n, t in SCHEMA_FIELDS.items() if n in by_name and by_name[n]["type"] != t]
        if missing or wrong:
            problem = f"lacks field(s) {missing}" if missing else f"has wrong types for {wrong}"
            raise GalleryError(
                f"collection {self.collection!r} {problem}: it was created by an older version "
                "of this service. Enrol into a new collection (--collection NAME), or drop "
                "this one (pymilvus: MilvusClient(uri).drop_collection(NAME)) and re-enrol"
            )
        have = int(by_name["embedding"].get("params", {}).get("dim", -1))
        if self.dim is None:
            self.dim = have
        if have != self.dim:
            raise GalleryError(
                f"collection {self.collection!r} stores {have}-d embeddings but the encoder "
                f"gives {self.dim}-d; use another collection or re-enrol the gallery"
            )

    def _vector(self, value: np.ndarray, what: str) -> list[float]:
        # Lite stores NaN/Inf silently and returns NaN scores: check before every call.
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
        if vec.shape != (self.dim,) or not np.all(np.isfinite(vec)):
            raise GalleryError(f"{what} is not a finite {self.dim}-d vector")
        if abs(float(np.linalg.norm(vec)) - 1.0) > NORM_TOLERANCE:
            raise GalleryError(f"{what} is not L2-normalised (IP scores assume unit vectors)")
        return vec.tolist()

    @_milvus_call("upsert")
    def upsert(self, records: Sequence[GalleryRecord]) -> None:
        """Store rows (replacing rows with the same ids, cached VQA answers included)."""
        if not records:
            return
        rows = []
        for r in records:
            _quoted([r.image_id], IMAGE_ID, "image id")
            _quoted([r.camera_id], CAMERA_ID, "camera id")
            rows.append(
                {
                    "image_id": r.image_id,
                    "camera_id": r.camera_id,
                    "captured_at_ms": int(r.captured_at_ms),
                    "track_id": r.track_id,
                    "image_uri": r.image_uri,
                    "vqa": "",  # a new image: answers about the old one no longer hold
                    "embedding": self._vector(r.embedding, f"embedding of {r.image_id!r}"),
                }
            )
        self._upsert_rows(rows)
        expiry = time.monotonic() + KNOWN_CAMERA_TTL_S
        self._known_cameras.update((r.camera_id, expiry) for r in records)
        if self.local:
            self._lite_rows += len(rows)
            self._advise_server()

    def _upsert_rows(self, rows: list[dict[str, Any]]) -> None:
        # never insert: ids are idempotent
        self._client.upsert(self.collection, rows, timeout=call_timeout())
        self._pending += len(rows)
        self._flush_pending(at_least=LITE_FLUSH_ROWS)

    @_milvus_call("search")
    def search(
        self, vector: np.ndarray, top_k: int, where: GalleryFilter, vqa_model_key: str = ""
    ) -> list[GalleryHit]:
        vec = self._vector(vector, "query")
        self._flush_pending()
        if vqa_model_key:
            _check_model_key(vqa_model_key)
        ef = max(top_k, self.search_ef if where.empty else self.filtered_search_ef)
        result = self._client.search(
            self.collection,
            data=[vec],
            limit=top_k,
            filter=filter_expression(where),
            # Never omit: Lite would return the vectors. The cached answers come with the hits
            # when asked for (Lite reads the whole row of a hit anyway; one call, not two).
            output_fields=[*META_FIELDS, "vqa"] if vqa_model_key else META_FIELDS,
            search_params={"metric_type": METRIC, "params": {"ef": ef}},
            consistency_level=self._consistency(),
            timeout=call_timeout(),
        )
        hits = []
        for hit in result[0]:
            e = hit["entity"]
            answers = _load_vqa(e["vqa"]).get(vqa_model_key) if vqa_model_key else None
            hits.append(
                GalleryHit(
                    image_id=str(hit.id),
                    camera_id=e["camera_id"],
                    captured_at_ms=int(e["captured_at_ms"]),
                    track_id=e["track_id"],
                    image_uri=e["image_uri"],
                    score=float(hit.distance),
                    vqa=tuple(str(a) for a in answers) if answers is not None else None,
                )
            )
        return hits

    def _query(
        self, expression: str, fields: list[str], limit: int = QUERY_PAGE
    ) -> list[dict[str, Any]]:
        """At most `limit` (<= QUERY_PAGE) rows matching `expression`.

        No offset paging: a server refuses offset + limit past its query window (16384).
        """
        return self._client.query(
            self.collection,
            filter=expression,
            output_fields=fields,
            limit=min(limit, QUERY_PAGE),
            consistency_level=self._consistency(),
            timeout=call_timeout(),
        )

    def _rows(self, image_ids: Sequence[str], fields: list[str]) -> dict[str, dict[str, Any]]:
        ids = list(dict.fromkeys(image_ids))
        found: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), QUERY_PAGE):
            chunk = ids[start : start + QUERY_PAGE]  # unique ids: one page holds every match
            for row in self._query(ids_expression(chunk), ["image_id", *fields], len(chunk)):
                found[str(row["image_id"])] = row
        return found

    @_milvus_call("fetch")
    def fetch(self, image_ids: Sequence[str]) -> list[GalleryRecord]:
        """Stored rows (metadata and embedding) for the ids that exist, in the given order."""
        rows = self._rows(image_ids, [*META_FIELDS, "embedding"])
        return [
            GalleryRecord(
                image_id=i,
                camera_id=r["camera_id"],
                captured_at_ms=int(r["captured_at_ms"]),
                track_id=r["track_id"],
                image_uri=r["image_uri"],
                embedding=np.asarray(r["embedding"], dtype=np.float32),
            )
            for i in dict.fromkeys(image_ids)
            if (r := rows.get(i)) is not None
        ]

    @_milvus_call("get_vqa")
    def get_vqa(self, image_ids: Sequence[str], model_key: str) -> dict[str, list[str]]:
        """Cached VQA answers stored under exactly `model_key`, for the ids that have them."""
        _check_model_key(model_key)
        out: dict[str, list[str]] = {}
        for image_id, row in self._rows(image_ids, ["vqa"]).items():
            answers = _load_vqa(row["vqa"]).get(model_key)
            if answers is not None:
                out[image_id] = list(answers)
        return out

    @_milvus_call("put_vqa")
    def put_vqa(self, answers: Mapping[str, list[str]], model_key: str) -> None:
        """Cache answers per image under `model_key`; other fields and models are kept.

        Milvus updates whole rows, so each row is read and upserted complete. Ids that are
        not (or no longer) in the gallery are skipped.
        """
        _check_model_key(model_key)
        if not answers:
            return
        rows = self._rows(list(answers), ["vqa", *META_FIELDS, "embedding"])
        updated = []
        for image_id, row in rows.items():
            cached = _load_vqa(row.pop("vqa"))
            cached.pop(model_key, None)
            cached[model_key] = [str(a) for a in answers[image_id]]  # newest last
            text = json.dumps(cached, separators=(",", ":"))
            while len(text) > VQA_MAX_CHARS and len(cached) > 1:
                cached.pop(next(iter(cached)))  # drop the oldest model's answers first
                text = json.dumps(cached, separators=(",", ":"))
            if len(text) > VQA_MAX_CHARS:
                raise GalleryError(
                    f"VQA answers of {image_id!r} need {len(text)} characters; at most "
                    f"{VQA_MAX_CHARS}"
                )
            row["vqa"] = text
            row["embedding"] = [float(x) for x in row["embedding"]]
            updated.append(row)
        skipped = len(answers) - len(updated)
        if skipped:
            log.info("put_vqa: %d image(s) are not in the gallery; skipped", skipped)
        self._upsert_rows(updated)

    @_milvus_call("delete")
    def delete(self, image_ids: Sequence[str], where: GalleryFilter) -> list[str]:
        """Delete the listed ids, or every row matching `where`; returns the ids removed.

        The caller removes what else it keeps per id (the crop store) from that list.
        """
        if len(image_ids) > MAX_IDS_PER_DELETE:
            raise ValueError(f"{len(image_ids)} image ids; at most {MAX_IDS_PER_DELETE}")
        if image_ids:
            expression = ids_expression(image_ids)
            if not where.empty:
                expression += " and " + filter_expression(where)
        elif not where.empty:
            expression = filter_expression(where)
        else:
            raise ValueError("refusing to delete with neither ids nor a filter")
        # Count what exists first: Lite echoes the requested ids, whether or not they existed.
        self._strong_until = time.monotonic() + STRONG_AFTER_DELETE_S  # see earlier deletes
        self._flush_pending()  # the filtered query below walks the MemTable
        self._known_cameras.clear()  # a camera may have lost its last row
        removed: list[str] = []
        gone: set[str] = set()
        while True:  # page by deleting: the next query no longer sees this page's rows
            self._strong_until = time.monotonic() + STRONG_AFTER_DELETE_S
            page = [str(row["image_id"]) for row in self._query(expression, ["image_id"])]
            if not page:
                return removed
            if gone.intersection(page):  # never loop forever on a backend that lags
                raise GalleryError("rows deleted a moment ago are still returned by queries")
            self._client.delete(self.collection, ids=page, timeout=call_timeout())
            removed.extend(page)
            gone.update(page)

    @_milvus_call("camera check")
    def unknown_cameras(self, camera_ids: Sequence[str]) -> list[str]:
        """The listed cameras no gallery row comes from.

        A camera seen in the last KNOWN_CAMERA_TTL_S (written through this adapter or found
        by a query) is not asked again: every camera-filtered search calls this, and each
        query cost about 8 ms on Lite at 10k rows. Deletes through this adapter clear the
        cache; a delete by another orchestrator is seen within the TTL (until then a search
        for a camera it emptied returns no hits instead of NOT_FOUND).
        """
        now = time.monotonic()
        cameras = [c for c in dict.fromkeys(camera_ids) if self._known_cameras.get(c, 0.0) <= now]
        if cameras:
            self._flush_pending()  # a filtered query walks the MemTable like a search
        unknown = []
        for camera in cameras:
            rows = self._client.query(
                self.collection,
                filter=f"camera_id == {_quoted([camera], CAMERA_ID, 'camera id')[1:-1]}",
                output_fields=["image_id"],
                limit=1,
                consistency_level=self._consistency(),
                timeout=call_timeout(),
            )
            if rows:
                self._known_cameras[camera] = now + KNOWN_CAMERA_TTL_S
            else:
                unknown.append(camera)
        return unknown

    @_milvus_call("count")
    def count(self) -> int:
        # Not row_count: on a server it stays 0 until a flush. Strong: counts are rare.
        self._flush_pending()
        rows = self._client.query(
            self.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level="Strong",
            timeout=call_timeout(),
        )
        return int(rows[0]["count(*)"])

    @_milvus_call("list")
    def list_page(self, where: GalleryFilter, after: str | None, limit: int) -> list[GalleryEntry]:
        """Rows after `after` in image_id (primary key) order: a keyset page, `image_id >
        last` in the filter and no offset, so no query window limits how deep one pages and
        rows enrolled or deleted meanwhile never shift a page. The page must hold the
        smallest keys across all segments, and the backends differ (measured, and tested in
        tests/test_gallery_paging.py): the 2.3.5 server merges a limited query in key order
        by itself, while Lite 3.2.2 does only with pymilvus' `iterator` flag (without it, a
        page skipped rows of a newer segment); on the server that flag hid rows upserted a
        moment before (growing segments), so only Lite gets it."""
        return [
            GalleryEntry(
                image_id=str(r["image_id"]),
                camera_id=r["camera_id"],
                captured_at_ms=int(r["captured_at_ms"]),
                track_id=r["track_id"],
                image_uri=r["image_uri"],
            )
            for r in self._keyset_page(where, after, limit, META_FIELDS)
        ]

    def _keyset_page(
        self, where: GalleryFilter, after: str | None, limit: int, fields: list[str]
    ) -> list[dict[str, Any]]:
        """The `limit` smallest image ids after `after` matching `where`, sorted (list_page)."""
        if not 1 <= limit <= QUERY_PAGE:
            raise ValueError(f"limit must be 1 to {QUERY_PAGE}, not {limit}")
        parts = [filter_expression(where)] if not where.empty else []
        if after is not None:
            parts.append(f"image_id > {_quoted([after], IMAGE_ID, 'image id')[1:-1]}")
        self._flush_pending()  # a filtered query walks Lite's MemTable like a search
        ordered: dict[str, str] = {"iterator": "True"} if self.local else {}
        rows = self._client.query(
            self.collection,
            filter=" and ".join(parts) or 'image_id != ""',
            output_fields=["image_id", *fields],
            limit=limit,
            consistency_level=self._consistency(),
            **ordered,
        )
        return sorted(rows, key=lambda r: str(r["image_id"]))

    @_milvus_call("stats")
    def stats(self) -> GalleryStats:
        """One keyset pass over the rows' camera and capture time (no vectors): Milvus 2.3
        has no GROUP BY. Measured at 20,000 rows on a busy 2-core machine: 0.6 s on the
        2.3.5 server, 4.3 s on Lite; tests/test_gallery_paging.py checks the counts."""
        per_camera: dict[str, int] = {}
        oldest: int | None = None
        newest: int | None = None
        total = 0
        after: str | None = None
        while True:
            rows = self._keyset_page(
                GalleryFilter(), after, QUERY_PAGE, ["camera_id", "captured_at_ms"]
            )
            for r in rows:
                cam, ms = r["camera_id"], int(r["captured_at_ms"])
                per_camera[cam] = per_camera.get(cam, 0) + 1
                oldest = ms if oldest is None else min(oldest, ms)
                newest = ms if newest is None else max(newest, ms)
            total += len(rows)
            if len(rows) < QUERY_PAGE:
                return GalleryStats(total, per_camera, oldest, newest)
            after = str(rows[-1]["image_id"])

    def reachable(self, timeout_s: float = 2.0) -> bool:
        """Whether Milvus answers and has the collection loaded (the service's health).

        A restarted Milvus server answers before its collections are loaded again, and
        every search then fails ("collection not loaded") or waits: not ready until loaded.
        A collection found released is loaded again here (without waiting for it)."""
        try:
            if not self._client.has_collection(self.collection, timeout=timeout_s):
                return False
            state = self._client.get_load_state(self.collection, timeout=timeout_s)["state"]
            if state == LoadState.NotLoad:
                log.warning("Milvus collection %r is not loaded: loading it", self.collection)
                self._client.load_collection(self.collection, timeout=timeout_s, _async=True)
            return bool(state == LoadState.Loaded)
        except MILVUS_ERRORS:
            return False

    def iter_vectors(self, batch_size: int = 1000) -> Iterator[tuple[list[str], np.ndarray]]:
        """Every row's id and stored embedding, in batches (pk-ordered query iterator: no
        offset, so no query window limits it)."""
        it = self._vector_iterator(batch_size)
        try:
            while batch := self._next_batch(it):
                ids = [str(r["image_id"]) for r in batch]
                yield ids, np.asarray([r["embedding"] for r in batch], dtype=np.float32)
        finally:
            it.close()

    @_milvus_call("read")
    def _vector_iterator(self, batch_size: int) -> Any:
        self._flush_pending()
        return self._client.query_iterator(
            self.collection,
            batch_size=batch_size,
            filter="",
            output_fields=["image_id", "embedding"],
            consistency_level="Strong",
        )

    @_milvus_call("read")
    def _next_batch(self, it: Any) -> list[dict[str, Any]]:
        return it.next()

    def close(self) -> None:
        self._client.close()


def _check_model_key(model_key: str) -> None:
    if not model_key or len(model_key) > MAX_MODEL_KEY_CHARS:
        raise ValueError(f"model_key must be 1 to {MAX_MODEL_KEY_CHARS} characters")


def _load_vqa(text: str) -> dict[str, list[str]]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        log.warning("ignoring an unreadable cached VQA entry")
        return {}
    return value if isinstance(value, dict) else {}
