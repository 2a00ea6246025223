"""The Milvus gallery adapter against both real backends: Milvus Lite and a Milvus server.

The server is the `milvus` 2.3.5 package's standalone binary, started on loopback by the
module fixture; every test gets its own collection (server) or data dir (Lite).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from pymilvus import DataType, MilvusClient

from icl.orchestrator import gallery as gallery_module
from icl.orchestrator.gallery import QUERY_PAGE, GalleryError, MilvusGallery, filter_expression
from icl.orchestrator.gallery_verify import verify_gallery
from icl.orchestrator.milvus_server import MilvusServer
from icl.ports import GalleryFilter, GalleryRecord
from tests.helpers import (
    gallery_records,
    group_members,
    proc_state,
    start_milvus_server,
    unit_vectors,
    wait_until,
)

DIM = 32
_names = itertools.count()


@pytest.fixture(scope="module")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    server = start_milvus_server(tmp_path_factory.mktemp("milvus-server"))
    yield server
    server.stop()


class Backend:
    def __init__(self, kind: str, tmp: Path, server: MilvusServer | None) -> None:
        self.kind, self.tmp, self.server = kind, tmp, server
        self.collection = f"g{next(_names)}"

    @property
    def uri(self) -> str:
        return self.server.uri if self.server else str(self.tmp / "gallery.db")

    def open(self, dim: int = DIM) -> MilvusGallery:
        return MilvusGallery(self.uri, dim, self.collection)


@pytest.fixture(params=["lite", "server"])
def backend(request, tmp_path) -> Backend:
    server = request.getfixturevalue("milvus_server") if request.param == "server" else None
    return Backend(request.param, tmp_path, server)


@pytest.fixture
def gallery(backend: Backend) -> Iterator[MilvusGallery]:
    g = backend.open()
    yield g
    g.close()


def _exact(vectors: np.ndarray, query: np.ndarray, k: int, keep=None) -> list[int]:
    scores = vectors @ query
    if keep is not None:
        scores = np.where(keep, scores, -np.inf)
    order = np.argsort(-scores)[:k]
    return [int(i) for i in order if np.isfinite(scores[i])]


def test_upsert_search_fetch(gallery):
    vectors = unit_vectors(300, DIM, seed=1)
    records = gallery_records(vectors)
    gallery.upsert(records)
    assert gallery.count() == 300
    hits = gallery.search(vectors[7], 5, GalleryFilter())
    assert [h.image_id for h in hits] == [f"r{i:05d}" for i in _exact(vectors, vectors[7], 5)]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    first = hits[0]
    assert (first.camera_id, first.captured_at_ms, first.track_id, first.image_uri) == (
        "cam-07",
        records[7].captured_at_ms,
        "t00002",
        "s3://crops/r00007.jpg",
    )
    fetched = gallery.fetch(["r00009", "missing", "r00003"])
    assert [r.image_id for r in fetched] == ["r00009", "r00003"]
    np.testing.assert_allclose(fetched[0].embedding, vectors[9], atol=1e-6)
    assert fetched[1].camera_id == "cam-03"


def test_upsert_is_idempotent_and_replaces(gallery):
    vectors = unit_vectors(50, DIM, seed=2)
    records = gallery_records(vectors)
    gallery.upsert(records)
    gallery.upsert(records[:20])  # an interrupted run sent again
    moved = GalleryRecord(**{**records[0].__dict__, "camera_id": "cam-99"})
    gallery.upsert([moved])
    assert gallery.count() == 50
    assert gallery.fetch(["r00000"])[0].camera_id == "cam-99"
    old = gallery.search(vectors[0], 50, GalleryFilter(camera_ids=("cam-00",)))
    assert "r00000" not in {h.image_id for h in old}
    hits = gallery.search(vectors[0], 50, GalleryFilter())
    assert len({h.image_id for h in hits}) == len(hits) == 50


def test_filters_match_exact_selection(gallery):
    vectors = unit_vectors(400, DIM, seed=3)
    records = gallery_records(vectors, cameras=8)
    gallery.upsert(records)
    cams = np.array([r.camera_id for r in records])
    times = np.array([r.captured_at_ms for r in records])
    t0 = records[100].captured_at_ms
    cases = [
        (GalleryFilter(camera_ids=("cam-03",)), cams == "cam-03"),
        (GalleryFilter(camera_ids=("cam-01", "cam-05")), np.isin(cams, ["cam-01", "cam-05"])),
        (GalleryFilter(start_ms=t0, end_ms=t0 + 49_000), (times >= t0) & (times <= t0 + 49_000)),
        (GalleryFilter(("cam-02",), start_ms=t0), (cams == "cam-02") & (times >= t0)),
    ]
    for where, keep in cases:
        hits = gallery.search(vectors[0], 400, where)
        assert {h.image_id for h in hits} == {
            r.image_id for r, k in zip(records, keep, strict=True) if k
        }
        top = gallery.search(vectors[11], 10, where)
        assert [h.image_id for h in top] == [
            f"r{i:05d}" for i in _exact(vectors, vectors[11], 10, keep)
        ]


HOSTILE = [
    'cam-01" or camera_id != "',
    "cam-01' or 1==1 or '",
    "x\\",
    'x\\" or 1==1 or \\"',
    "cam-01] or [1",
    "cam-01 or 1==1",
    "",
    "ü" * 70,
]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_values_cannot_change_a_filter(gallery, value):
    gallery.upsert(gallery_records(unit_vectors(20, DIM, seed=4)))
    with pytest.raises(ValueError, match="must match"):
        filter_expression(GalleryFilter(camera_ids=("cam-01", value)))
    with pytest.raises(ValueError):
        gallery.search(unit_vectors(1, DIM)[0], 5, GalleryFilter(camera_ids=(value,)))
    with pytest.raises(ValueError):
        gallery.delete([value], GalleryFilter())
    assert gallery.count() == 20
    # The quoting alone (the second line of defence) keeps the value one string literal
    # (Milvus expressions know no \u escapes, hence ensure_ascii=False here).
    literal = json.dumps([value], ensure_ascii=False)
    assert gallery._query(f"camera_id in {literal}", ["image_id"]) == []


def test_long_lists(gallery):
    gallery.upsert(gallery_records(unit_vectors(30, DIM, seed=5)))
    cams = tuple(f"cam-{i:02d}" for i in range(256))
    assert len(gallery.search(unit_vectors(1, DIM)[0], 30, GalleryFilter(cams))) == 30
    with pytest.raises(ValueError, match="at most 256"):
        filter_expression(GalleryFilter((*cams, "cam-x")))
    ids = [f"r{i:05d}" for i in range(10_000)]
    assert len(gallery.delete(ids, GalleryFilter(camera_ids=("cam-01",)))) == 3
    with pytest.raises(ValueError, match="at most 10000"):
        gallery.delete([*ids, "r99999"], GalleryFilter())


def test_delete_by_ids_camera_and_time(gallery):
    records = gallery_records(unit_vectors(100, DIM, seed=6))
    gallery.upsert(records)
    assert gallery.delete(["r00001", "r00002", "nope"], GalleryFilter()) == ["r00001", "r00002"]
    assert gallery.delete(["r00001"], GalleryFilter()) == []
    assert len(gallery.delete([], GalleryFilter(camera_ids=("cam-05",)))) == 10
    t = records[90].captured_at_ms
    assert len(gallery.delete([], GalleryFilter(start_ms=t))) == 9  # r00095 went with cam-05
    assert gallery.count() == 100 - 2 - 10 - 9
    assert gallery.unknown_cameras(["cam-05", "cam-06"]) == ["cam-05"]
    with pytest.raises(ValueError):
        gallery.delete([], GalleryFilter())


def test_delete_and_fetch_past_the_query_window(gallery):
    """More rows than one query may return (a server's window is offset + limit <= 16384)."""
    n = QUERY_PAGE + 1000
    records = gallery_records(unit_vectors(n, DIM, seed=9), cameras=1)  # all on cam-00
    for start in range(0, n, 5000):
        gallery.upsert(records[start : start + 5000])
    keep = GalleryRecord(**{**records[0].__dict__, "image_id": "keep", "camera_id": "cam-01"})
    gallery.upsert([keep])
    ids = [r.image_id for r in records]
    assert [r.image_id for r in gallery.fetch(ids[::-1])] == ids[::-1]
    removed = gallery.delete([], GalleryFilter(camera_ids=("cam-00",)))
    assert sorted(removed) == ids
    assert gallery.count() == 1 and gallery.fetch(ids) == []


def test_lite_channel_sends_no_idle_keepalive_pings(tmp_path):
    """Lite's in-process gRPC server answers idle pings with GOAWAY (too_many_pings), which
    gRPC logs as an error every minute or two of an idle demo; the adapter turns them off.
    (Checked by hand: 130 s idle, 2 GOAWAY lines with pymilvus' defaults, none with these.)"""
    g = MilvusGallery(str(tmp_path / "ka.db"), DIM, "ka")
    options = g._client._get_connection()._grpc_options
    assert options["grpc.keepalive_permit_without_calls"] == 0
    assert options["grpc.keepalive_time_ms"] >= 10 * 60 * 1000
    g.close()


def test_search_uses_the_configured_beam(tmp_path, monkeypatch):
    with pytest.raises(GalleryError, match="search_ef must be 1 to 32768, not 0"):
        MilvusGallery(str(tmp_path / "ef.db"), DIM, "ef", search_ef=0)
    g = MilvusGallery(str(tmp_path / "ef.db"), DIM, "ef", search_ef=48, filtered_search_ef=96)
    vectors = unit_vectors(30, DIM, seed=11)
    g.upsert(gallery_records(vectors))
    beams: list[int] = []
    search = g._client.search

    def spy(*args, **kwargs):
        beams.append(kwargs["search_params"]["params"]["ef"])
        return search(*args, **kwargs)

    monkeypatch.setattr(g._client, "search", spy)
    assert g.search(vectors[0], 5, GalleryFilter())[0].image_id == "r00000"
    assert g.search(vectors[1], 5, GalleryFilter(("cam-01",)))[0].image_id == "r00001"
    assert len(g.search(vectors[2], 60, GalleryFilter())) == 30  # ef never below top_k
    assert beams == [48, 96, 60]
    g.close()


def test_known_cameras_are_not_queried_again(gallery, monkeypatch):
    gallery.upsert(gallery_records(unit_vectors(20, DIM, seed=7)))  # cam-00 .. cam-09
    queried: list[str] = []
    query = gallery._client.query

    def spy(*args, **kwargs):
        queried.append(kwargs["filter"])
        return query(*args, **kwargs)

    monkeypatch.setattr(gallery._client, "query", spy)
    assert gallery.unknown_cameras(["cam-01", "cam-77"]) == ["cam-77"]
    assert queried == ['camera_id == "cam-77"']  # cam-01 was written through this adapter
    assert gallery.unknown_cameras(["cam-77"]) == ["cam-77"]  # unknown ones are asked each time
    assert len(queried) == 2
    gallery._known_cameras.clear()  # e.g. a restarted orchestrator: learns cam-01 by one query
    assert gallery.unknown_cameras(["cam-01"]) == gallery.unknown_cameras(["cam-01"]) == []
    assert queried[2:] == ['camera_id == "cam-01"']
    gallery.delete([], GalleryFilter(camera_ids=("cam-01",)))  # empties cam-01
    assert gallery.unknown_cameras(["cam-01", "cam-02"]) == ["cam-01"]


def test_lite_advises_a_server_once_past_its_size(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(gallery_module, "LITE_ADVISED_MAX_ROWS", 30)
    records = gallery_records(unit_vectors(40, DIM, seed=8))

    def advice() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == gallery_module.__name__]

    with caplog.at_level(logging.WARNING, logger=gallery_module.__name__):
        g = MilvusGallery(str(tmp_path / "big.db"), DIM, "big")
        g.upsert(records[:20])
        g.upsert(records[:20])  # the same ids again: still 20 rows, no advice
        assert advice() == []
        g.upsert(records[20:])
        g.upsert(records[:5])
        g.close()
        assert advice() == [
            "the gallery holds 40 images in Milvus Lite; past about 30, serve it from a Milvus "
            "server (--milvus-uri http://HOST:19530) for faster searches (docs/gallery.md)"
        ]
        MilvusGallery(str(tmp_path / "big.db"), DIM, "big").close()  # said again at open
        assert len(advice()) == 2


def test_vqa_cache(gallery):
    vectors = unit_vectors(10, DIM, seed=7)
    gallery.upsert(gallery_records(vectors))
    before = gallery.search(vectors[2], 10, GalleryFilter())
    answers = {"r00002": ["red", "yes", "long"], "r00003": ["blue"], "gone": ["x"]}
    gallery.put_vqa(answers, "qwen2-vl-2b@1")
    gallery.put_vqa({"r00002": ["other"]}, "mllm-b@2")
    assert gallery.get_vqa(["r00002", "r00003", "r00004"], "qwen2-vl-2b@1") == {
        "r00002": ["red", "yes", "long"],
        "r00003": ["blue"],
    }
    assert gallery.get_vqa(["r00002", "r00003"], "mllm-b@2") == {"r00002": ["other"]}
    assert gallery.get_vqa(["r00002"], "qwen2-vl-2b") == {}
    assert gallery.count() == 10
    # Every other field of the row is intact: same ranking, scores, metadata, vectors.
    # (Scores may differ in the last bit: exact search multiplies matrices whose shape
    # changes once rewritten rows sit in their own segment.)
    after = gallery.search(vectors[2], 10, GalleryFilter())
    assert [replace(h, score=0.0) for h in after] == [replace(h, score=0.0) for h in before]
    np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-6)
    np.testing.assert_allclose(gallery.fetch(["r00002"])[0].embedding, vectors[2], atol=1e-6)
    # Re-enrolling an image drops answers about the old one.
    gallery.upsert(gallery_records(vectors)[2:3])
    assert gallery.get_vqa(["r00002"], "mllm-b@2") == {}


def test_bad_vectors_are_refused(gallery):
    good = unit_vectors(1, DIM)[0]
    for bad in (np.full(DIM, np.nan), good[:-1], good * 3):
        with pytest.raises(GalleryError):
            gallery.upsert(gallery_records([bad]))
        with pytest.raises(GalleryError):
            gallery.search(bad, 5, GalleryFilter())
    assert gallery.count() == 0


def test_old_or_mismatched_collections_are_refused(backend):
    client = MilvusClient(uri=backend.uri)
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("image_id", DataType.VARCHAR, is_primary=True, max_length=128)
    schema.add_field("camera_id", DataType.VARCHAR, max_length=64)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=DIM)
    index = client.prepare_index_params()
    index.add_index("embedding", index_type="FLAT", metric_type="IP")
    client.create_collection(backend.collection, schema=schema, index_params=index)
    client.close()
    with pytest.raises(GalleryError, match=r"older version.*new collection.*drop"):
        backend.open()
    backend.collection += "b"
    backend.open().close()
    with pytest.raises(GalleryError, match="stores 32-d embeddings"):
        backend.open(dim=64)


def test_recall_at_10_against_exact(gallery):
    vectors = unit_vectors(3000, DIM, seed=8)
    records = gallery_records(vectors, cameras=10)
    for start in range(0, 3000, 1000):
        gallery.upsert(records[start : start + 1000])
    queries = unit_vectors(30, DIM, seed=9)
    cams = np.array([r.camera_id for r in records])
    for where, keep in [(GalleryFilter(), None), (GalleryFilter(("cam-04",)), cams == "cam-04")]:
        recall = []
        for q in queries:
            want = {f"r{i:05d}" for i in _exact(vectors, q, 10, keep)}
            got = {h.image_id for h in gallery.search(q, 10, where)}
            recall.append(len(want & got) / 10)
        assert np.mean(recall) >= 0.95, (where, np.mean(recall))


def test_restart_keeps_rows(backend, tmp_path):
    vectors = unit_vectors(200, DIM, seed=10)
    g = backend.open()
    g.upsert(gallery_records(vectors))
    g.put_vqa({"r00001": ["a"]}, "m@1")
    before = g.search(vectors[5], 20, GalleryFilter(camera_ids=("cam-05", "cam-06")))
    g.close()
    if backend.server is not None:
        backend.server.stop()
        backend.server.start()
    g = backend.open()
    try:
        assert g.count() == 200
        after = g.search(vectors[5], 20, GalleryFilter(camera_ids=("cam-05", "cam-06")))
        # Same rows and order; scores may differ in the last float bits once Lite answers
        # from its HNSW index rather than its in-memory buffer.
        assert [h.image_id for h in after] == [h.image_id for h in before]
        np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-5)
        assert g.get_vqa(["r00001"], "m@1") == {"r00001": ["a"]}
    finally:
        g.close()


def test_a_killed_server_is_reaped_at_once(tmp_path):
    """Defect: a SIGKILLed server stayed a zombie of the launching process until stop()."""
    server = start_milvus_server(tmp_path / "milvus")
    try:
        assert server.process is not None
        pid = server.process.pid
        os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: proc_state(pid) is None, 5), f"pid {pid}: {proc_state(pid)}"
        with pytest.raises(ChildProcessError):  # reaped, not a zombie waiting for us
            os.waitpid(pid, os.WNOHANG)
        assert wait_until(lambda: not group_members(pid), 5)
        assert not server.running and server.returncode == -signal.SIGKILL
    finally:
        server.stop()  # a no-op after the death: it does not raise
    assert server.process is None


def test_lite_flushes_pending_rows_and_stays_exact(tmp_path, monkeypatch):
    """Lite's MemTable is flushed lazily (before reads, and past LITE_FLUSH_ROWS pending
    rows); rows in the MemTable, in flushed segments and their tombstones all agree."""
    import icl.orchestrator.gallery as gallery_module

    monkeypatch.setattr(gallery_module, "LITE_FLUSH_ROWS", 64)
    g = MilvusGallery(str(tmp_path / "gallery.db"), DIM, "flush")
    try:
        vectors = unit_vectors(500, DIM, seed=11)
        records = gallery_records(vectors)
        for start in range(0, 500, 50):  # some chunks flush on write, the rest before reads
            g.upsert(records[start : start + 50])
            assert g._pending < 64
            if start % 100 == 0:
                hits = g.search(vectors[start], 1, GalleryFilter())
                assert hits[0].image_id == f"r{start:05d}"
                assert g._pending == 0
        moved = GalleryRecord(**{**records[3].__dict__, "camera_id": "cam-99"})
        g.upsert([moved])  # pending: replaces a row that is in a flushed segment
        g.put_vqa({"r00004": ["a"]}, "m@1")
        assert g.delete(["r00005"], GalleryFilter()) == ["r00005"]
        assert g.count() == 499
        keep = np.array([r.camera_id == "cam-03" for r in records])
        keep[5] = False
        hits = g.search(vectors[13], 20, GalleryFilter(("cam-03",)))
        assert [h.image_id for h in hits] == [
            f"r{i:05d}" for i in _exact(vectors, vectors[13], 20, keep & (np.arange(500) != 3))
        ]
        assert g.unknown_cameras(["cam-99", "cam-98"]) == ["cam-98"]
        assert g.get_vqa(["r00004"], "m@1") == {"r00004": ["a"]}
    finally:
        g.close()


def _old_hnsw_collection(backend: Backend, dim: int = DIM) -> MilvusGallery:
    """A collection as the previous version made it (HNSW M 16, efConstruction 200), opened
    without the index migration, so rows written through it land in an HNSW graph."""
    g = backend.open(dim)
    g.close()
    client = MilvusClient(uri=backend.uri)
    client.release_collection(backend.collection)
    client.drop_index(backend.collection, "embedding")
    index = client.prepare_index_params()
    hnsw = {"M": 16, "efConstruction": 200}
    index.add_index("embedding", index_type="HNSW", metric_type="IP", **hnsw, params=hnsw)
    client.create_index(backend.collection, index)
    client.close()
    return MilvusGallery(backend.uri, None, backend.collection, inspect_only=True)


def _duplicates_beside_distinct(n_distinct: int = 300, n_equal: int = 1152):
    """The tester's case: many crops with one embedding (blank frames) among distinct ones."""
    distinct = unit_vectors(n_distinct, DIM, seed=21)
    equal = np.repeat(unit_vectors(1, DIM, seed=22), n_equal, axis=0)
    records = gallery_records(distinct) + [
        GalleryRecord(**{**r.__dict__, "image_id": f"blank{i:05d}"})
        for i, r in enumerate(gallery_records(equal))
    ]
    order = np.random.default_rng(23).permutation(len(records))
    return distinct, [records[i] for i in order]


def _seal(g: MilvusGallery) -> None:
    """Lite: rows are flushed before reads. A server seals segments and builds their index
    on its own within minutes; a flush makes it happen now."""
    if not g.local:
        g._client.flush(g.collection)
        g._client.load_collection(g.collection)


def _distinct_found(g: MilvusGallery, distinct: np.ndarray) -> tuple[int, float]:
    """How many distinct rows a search for their own vector finds, and recall@10 by score
    against exact search over what the gallery holds."""
    ids, chunks = [], []
    for batch_ids, batch in g.iter_vectors():
        ids += batch_ids
        chunks.append(batch)
    stored = np.concatenate(chunks)
    found, recall = 0, []
    for i, v in enumerate(distinct):
        hits = g.search(v, 10, GalleryFilter())
        found += f"r{i:05d}" in {h.image_id for h in hits}
        kth = np.sort(stored @ v)[::-1][9]
        recall.append(sum(h.score >= kth - 1e-4 for h in hits) / 10)
    return found, float(np.mean(recall))


def test_identical_vectors_leave_every_row_searchable(backend):
    """Defect: 1,152 equal embeddings beside 300 distinct ones made the distinct rows
    unreachable by any search on Lite (its HNSW graph), and on the server once the equal
    rows were deleted (deleted rows stay in its graph). Exact search keeps every row."""
    distinct, records = _duplicates_beside_distinct()
    g = backend.open()
    try:
        for start in range(0, len(records), 64):
            g.upsert(records[start : start + 64])
        _seal(g)
        assert _distinct_found(g, distinct) == (300, 1.0)
        assert len(g.search(distinct[0], len(records), GalleryFilter())) == len(records)
        g.close()
        g = backend.open()  # reopened
        assert _distinct_found(g, distinct) == (300, 1.0)
        blanks = [r.image_id for r in records if r.image_id.startswith("blank")]
        for start in range(0, len(blanks), 1000):
            g.delete(blanks[start : start + 1000], GalleryFilter())
        _seal(g)
        assert _distinct_found(g, distinct) == (300, 1.0)
        assert len(g.search(distinct[0], 1000, GalleryFilter())) == 300
        g.close()
        g = backend.open()  # deleted, then reopened
        assert _distinct_found(g, distinct) == (300, 1.0)
        report = verify_gallery(g, sample=0, k=10)
        assert (report.rows, report.sampled, report.recall_at_k) == (300, 300, 1.0)
        assert report.unreachable == []
    finally:
        g.close()


def test_verify_finds_unreachable_rows_and_opening_repairs_them(tmp_path):
    """An HNSW collection of the previous version on Lite loses rows to equal vectors;
    `verify` names them, and opening the collection normally rebuilds it as FLAT."""
    backend = Backend("lite", tmp_path, None)
    distinct, records = _duplicates_beside_distinct()
    g = _old_hnsw_collection(backend)
    for start in range(0, len(records), 64):
        g.upsert(records[start : start + 64])
    report = verify_gallery(g, sample=0, k=10)
    g.close()
    assert report.rows == report.sampled == len(records)
    assert set(report.unreachable) <= {r.image_id for r in records}
    assert len([i for i in report.unreachable if i.startswith("r")]) >= 50  # distinct rows
    assert report.recall_at_k < 0.99
    g = backend.open()  # the service's open: HNSW -> FLAT
    try:
        assert g._client.describe_index(g.collection, "embedding")["index_type"] == "FLAT"
        report = verify_gallery(g, sample=0, k=10)
        assert report.unreachable == [] and report.recall_at_k == 1.0
        assert _distinct_found(g, distinct) == (300, 1.0)
    finally:
        g.close()


def test_verify_samples_and_pages(gallery):
    vectors = unit_vectors(2500, DIM, seed=24)
    gallery.upsert(gallery_records(vectors))
    report = verify_gallery(gallery, sample=50, k=5)
    assert (report.rows, report.sampled, report.k) == (2500, 50, 5)
    assert report.recall_at_k == 1.0 and report.unreachable == []
    with pytest.raises(ValueError):
        verify_gallery(gallery, sample=10, k=0)
