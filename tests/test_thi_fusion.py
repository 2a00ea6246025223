"""Online fusion is one search with the fused vector; it must equal the method's fusion over
the whole gallery (icl.thi.engine.fuse on the full similarity matrix).

Pure logic over the in-memory gallery (exact search, as Milvus' FLAT index): the MLLM is a
stand-in that says Yes by image (what it says is not under test; the fusion after it is), so
anchors fall on different ranks, with and without filters and with an operator's anchor
inside and outside the filter.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence

import numpy as np
import pytest

from icl.orchestrator.memory_gallery import MemoryGallery
from icl.orchestrator.thi_search import thi_search
from icl.ports import GalleryFilter, GalleryRecord
from icl.thi.engine import ThiParams, fuse

pytestmark = pytest.mark.unit

DIM = 32
N = 400


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class YesByImage:
    """Yes for every third image (by the index the crop stand-in carries)."""

    model_key = "stand-in@1"
    can_generate = False

    async def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        return [0.9 if int(im[0, 0]) % 3 == 0 else 0.1 for im in images]

    async def generate(self, images: Sequence[np.ndarray], prompt: str, max_tokens: int = 256):
        return f"1. The person is number {int(images[0][0, 0])}."


class IndexCrops:
    def put_many(self, items) -> None:
        raise AssertionError("not used")

    def load(self, image_ids: Sequence[str]) -> list[np.ndarray]:
        return [np.full((2, 2), int(i[1:]), dtype=np.int64) for i in image_ids]


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(7)
    # Clustered, like people seen several times: near-ties are common.
    centres = _unit(rng.standard_normal((40, DIM)))
    emb = _unit(centres[rng.integers(0, 40, N)] + 0.3 * rng.standard_normal((N, DIM)))
    gallery = MemoryGallery(DIM)
    gallery.upsert(
        [
            GalleryRecord(f"i{k}", f"cam-{k % 4}", 1000 * k, f"t{k // 3}", "", emb[k])
            for k in range(N)
        ]
    )
    return gallery, emb, centres


def _refined(texts: Sequence[str]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(texts[0].encode()))
    return _unit(rng.standard_normal((1, DIM)))


async def _run(gallery, q, where, params, confirmed=None, top_k=10):
    async def in_gallery(fn, *args):
        return fn(*args)

    async def encode(texts):
        return _refined(texts)

    return await thi_search(
        "a person",
        q,
        top_k,
        where,
        params,
        gallery=gallery,
        in_gallery=in_gallery,
        encode_texts=encode,
        mllm=YesByImage(),
        crops=IndexCrops(),
        mllm_timeout_s=10.0,
        confirmed_anchor=confirmed,
    )


def _expected(emb, q, r, keep, anchor, lam, top_k):
    rows = np.flatnonzero(keep)
    at = int(np.flatnonzero(rows == anchor)[0]) if anchor is not None and keep[anchor] else None
    fused = fuse(emb[rows] @ q, emb[rows] @ r, at, lam)
    order = np.argsort(-fused, kind="stable")[:top_k]
    return [f"i{rows[i]}" for i in order], fused[order]


@pytest.mark.parametrize("camera", [None, "cam-1"])
@pytest.mark.parametrize("xi", [float("-inf"), float("inf")])
def test_fused_search_is_the_full_gallery_fusion(world, camera, xi) -> None:
    gallery, emb, centres = world
    rng = np.random.default_rng(11)
    where = GalleryFilter(camera_ids=(camera,)) if camera else GalleryFilter()
    keep = np.array([camera is None or k % 4 == int(camera[-1]) for k in range(N)])
    params = ThiParams(xi=xi, lam=0.8, candidates=5)
    anchors = 0
    for _ in range(60):
        q = _unit(centres[rng.integers(0, 40)] + 0.5 * rng.standard_normal(DIM))
        result = asyncio.run(_run(gallery, q, where, params))
        if result.outcome.anchor is None:
            continue
        anchors += 1
        anchor = int(result.anchor_id[1:])
        r = _refined([result.outcome.refined_query])[0]
        want_ids, want_scores = _expected(emb, q, r, keep, anchor, params.lam, 10)
        got = result.hits
        np.testing.assert_allclose([h.score for h in got], want_scores, atol=1e-5)
        # Ids agree except where two scores tie to float32 precision.
        for h, w, s in zip(got, want_ids, want_scores, strict=True):
            assert h.image_id == w or abs(h.score - s) < 1e-5
        assert result.exact
    assert anchors >= 8  # the comparison ran (on anchors at several ranks when xi is +inf)


@pytest.mark.parametrize(("anchor", "inside"), [(5, True), (6, False)])
def test_a_confirmed_anchor_is_pinned_only_inside_the_filter(world, anchor, inside) -> None:
    gallery, emb, centres = world
    where = GalleryFilter(camera_ids=("cam-1",))  # image 5 is on cam-1, image 6 on cam-2
    q = _unit(emb[anchor] + 0.2 * centres[3])  # close enough for the anchor to rank
    record = gallery.fetch([f"i{anchor}"])[0]
    params = ThiParams()
    result = asyncio.run(_run(gallery, q, where, params, confirmed=record))
    assert result.outcome.anchor_confirmed and result.anchor_id == f"i{anchor}"
    keep = np.array([k % 4 == 1 for k in range(N)])
    r = _refined([result.outcome.refined_query])[0]
    want_ids, want_scores = _expected(emb, q, r, keep, anchor, params.lam, 10)
    assert [h.image_id for h in result.hits] == want_ids
    np.testing.assert_allclose([h.score for h in result.hits], want_scores, atol=1e-5)
    assert (f"i{anchor}" in [h.image_id for h in result.hits]) is inside
    if inside:  # refined score pinned to 1: lambda * base + (1 - lambda)
        (hit,) = [h for h in result.hits if h.image_id == f"i{anchor}"]
        assert hit.score == pytest.approx(params.lam * float(emb[anchor] @ q) + 1 - params.lam)
