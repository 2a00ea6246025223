"""THI's refinement step with a generating MLLM is the same offline and online.

The MLLM is the tiny random Qwen2-VL of tests/test_mllm_qwen2vl.py (the real transformers
class, random weights: its words are noise, but greedy decoding makes them deterministic).
Offline is `ThiReplay`, what `icl eval --thi` runs; online is the orchestrator's `thi_search`
over Milvus Lite and the crop store, with the same backend in this process through
`InProcessMllm` (serving Qwen2-VL through Triton would add only the transport, which
tests/test_thi_online.py checks with the demo MLLM; loading transformers in a Triton stub
too would make this test minutes long). Both must ask the aggregation prompt and get the
same refined query.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from icl.demo import DEMO_WEIGHTS, demo_path
from icl.evaluation import embed_images, embed_texts
from icl.images import decode_crop
from icl.mllm.contract import merge_answers
from icl.mllm.inprocess import InProcessMllm
from icl.mllm.qwen2vl import Qwen2VLBackend
from icl.models.dual_encoder import load_checkpoint
from icl.models.pretrained import tokenizer_for
from icl.orchestrator.crops import CropStore
from icl.orchestrator.gallery import MilvusGallery
from icl.orchestrator.thi_search import thi_search
from icl.ports import GalleryFilter, GalleryRecord
from icl.synthetic.demo_gallery import demo_gallery, demo_queries
from icl.thi.engine import ThiParams
from icl.thi.offline import ThiData, ThiReplay
from tests.test_mllm_qwen2vl import build_tiny_qwen2vl

N_IMAGES = 12
QUERIES = demo_queries(seed=5, count=2)
# xi -inf: rank 1 is checked alone; any P(Yes) > 0 is Yes, so rank 1 is always the anchor
# (the random model's P(Yes) is noise; the refinement, not the verdict, is under test).
PARAMS = ThiParams(xi=float("-inf"), yes_threshold=0.0)


class ShortQwen2VL(Qwen2VLBackend):
    """The real backend with answers capped at 32 new tokens (THI asks for up to 256; the
    random model rarely stops early, and 256 tokens of noise only make the test slow)."""

    def generate(self, images, prompt, max_tokens=None, on_text=None) -> str:
        return super().generate(images, prompt, min(max_tokens or 32, 32), on_text)


def test_offline_and_online_refine_with_the_aggregation_prompt(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    backend = ShortQwen2VL(build_tiny_qwen2vl(tmp_path / "tiny-qwen2vl"))
    model = load_checkpoint(demo_path(DEMO_WEIGHTS))
    tok = tokenizer_for(model.config)
    demo = list(demo_gallery(N_IMAGES, seed=5))
    ids = [d.image_id for d in demo]
    crops = [np.asarray(Image.open(io.BytesIO(d.png)).convert("RGB")) for d in demo]
    gallery_emb = embed_images(
        model, np.stack([decode_crop(d.png, model.config.image_size) for d in demo])
    )
    query_emb = embed_texts(model, tok(QUERIES))

    def encode(texts: Sequence[str]) -> np.ndarray:
        return embed_texts(model, tok(texts))

    replay = ThiReplay(
        ThiData(
            sims=query_emb @ gallery_emb.T,
            query_texts=QUERIES,
            query_ids=np.arange(len(QUERIES)),
            gallery_ids=np.arange(N_IMAGES),
            gallery_images=crops,
            gallery_embeddings=gallery_emb,
            encode_texts=encode,
        ),
        backend,
        PARAMS.candidates,
    )
    anchors = replay.anchors(PARAMS)

    gallery = MilvusGallery(str(tmp_path / "gallery.db"), gallery_emb.shape[1], "thi")
    store = CropStore(tmp_path / "crops")
    try:
        gallery.upsert(
            [
                GalleryRecord(d.image_id, d.camera_id, d.captured_at_ms, d.track_id, "", e)
                for d, e in zip(demo, gallery_emb, strict=True)
            ]
        )
        store.put_many((d.image_id, d.png) for d in demo)

        async def in_gallery(fn, *args):
            return await asyncio.to_thread(fn, *args)

        async def encode_online(texts: Sequence[str]) -> np.ndarray:
            return encode(texts)

        async def online(q: int):
            return await thi_search(
                QUERIES[q],
                query_emb[q],
                5,
                GalleryFilter(),
                PARAMS,
                gallery=gallery,
                in_gallery=in_gallery,
                encode_texts=encode_online,
                mllm=InProcessMllm(backend),
                crops=store,
                mllm_timeout_s=600.0,
            )

        for q, text in enumerate(QUERIES):
            result = asyncio.run(online(q))
            out = result.outcome
            assert out.fallback_reason == "" and out.anchor == 0
            anchor = int(anchors[q])
            assert result.candidates[0].image_id == ids[anchor]
            assert out.answers == replay.answers(anchor)
            offline = replay.refined_query(q, anchor)
            assert out.refined_query == offline
            # The aggregation prompt was asked (one call after the yes/no and the VQA), so
            # this is not the deterministic merge both would fall back to.
            assert out.evaluations == 3
            assert offline != merge_answers(text, out.answers)
            # The fused top 5 is the full-gallery fusion offline.
            fused = replay.fused(anchors, PARAMS.lam)[q]
            want = [ids[i] for i in np.argsort(-fused, kind="stable")[:5]]
            assert [h.image_id for h in result.hits] == want
            assert result.exact
            np.testing.assert_allclose(
                [h.score for h in result.hits], np.sort(fused)[::-1][:5], atol=1e-4
            )
    finally:
        gallery.close()


@pytest.mark.unit
def test_demo_backend_refines_by_merging() -> None:
    """The demo MLLM has no free-text generation: the same step merges, with no call."""
    from icl.mllm.demo import load_demo_backend
    from icl.thi.engine import refine_query

    backend = load_demo_backend()
    assert not backend.can_generate
    answers = ["The person is a man.", "Cannot tell."]
    refined, calls = asyncio.run(refine_query("a man in a coat", answers, InProcessMllm(backend)))
    assert refined == merge_answers("a man in a coat", answers) and calls == 0
