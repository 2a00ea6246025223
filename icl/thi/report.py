"""The THI evaluation behind `icl eval --thi`: tune on one split, report on another."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icl.data.readers import ImageRecord, ReidDataset
from icl.evaluation import embed_images, embed_texts, retrieval_set
from icl.mllm.contract import MllmBackend
from icl.models.dual_encoder import DualEncoder
from icl.models.pretrained import tokenizer_for
from icl.thi.engine import ThiParams
from icl.thi.offline import Row, ThiData, ThiReplay, TuningLimits, engine_cost, tune

XI_GRID = (float("-inf"), 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, float("inf"))
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def _native(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _fits(root: Path, records: Sequence[ImageRecord]):
    """fits(q, g): every attribute query q's caption states is true of gallery image g."""
    labels_file = root / "attributes.json"
    if not labels_file.is_file():
        return None
    labels = json.loads(labels_file.read_text())
    image_root = (root / "imgs").resolve()
    rels = [r.image_path.relative_to(image_root).as_posix() for r in records]
    if any("mentions" not in labels.get(rel, {}) for rel in rels):
        return None
    mentions = [m for rel in rels for m in labels[rel]["mentions"]]
    gallery = [labels[rel] for rel in rels]

    def fits(q: int, g: int) -> bool:
        return all(gallery[g].get(a) == v for a, v in mentions[q].items())

    return fits


def thi_data(model: DualEncoder, root: Path, records: Sequence[ImageRecord]) -> ThiData:
    tok = tokenizer_for(model.config)
    rs = retrieval_set(records, model.config.image_size)
    text = embed_texts(model, tok(rs.query_texts))
    image = embed_images(model, rs.gallery_pixels)
    return ThiData(
        sims=text @ image.T,
        query_texts=rs.query_texts,
        query_ids=rs.query_ids,
        gallery_ids=rs.gallery_ids,
        gallery_images=[_native(p) for p in rs.gallery_paths],
        gallery_embeddings=image,
        encode_texts=lambda texts: embed_texts(model, tok(texts)),
        fits_caption=_fits(root, records),
    )


def _row_dict(row: Row) -> dict[str, Any]:
    return {
        "name": row.name,
        "xi": row.params.xi,
        "yes_threshold": row.params.yes_threshold,
        "metrics": row.metrics.as_dict(),
        "anchor_rate": row.anchor_rate,
        "anchor_precision": row.anchor_precision,
        "rounds": [m.as_dict() for m in row.rounds],
    }


def evaluate_thi(
    model: DualEncoder,
    dataset: ReidDataset,
    backend: MllmBackend,
    split: str = "test",
    tune_split: str = "val",
    base: ThiParams | None = None,
    *,
    fixed: bool = False,
) -> dict[str, Any]:
    """`fixed`: use `base` as given (xi, threshold) instead of tuning them on `tune_split`,
    to compare models under one setting."""
    base = base or ThiParams()
    if fixed:
        tuned, within_limits, tune_split = base, True, "(fixed, not tuned)"
    else:
        val = ThiReplay(
            thi_data(model, dataset.root, dataset.split(tune_split)), backend, base.candidates
        )
        tuned, within_limits = tune(val, base, XI_GRID, THRESHOLD_GRID, TuningLimits())
    test = ThiReplay(thi_data(model, dataset.root, dataset.split(split)), backend, base.candidates)
    no_anchor = np.zeros_like(test.p_yes)
    rows = [
        test.evaluate("base (THI off)", tuned, p_yes=no_anchor),
        test.evaluate(f"THI, xi {tuned.xi:g}, Yes > {tuned.yes_threshold:g}", tuned),
        test.evaluate("THI, xi = +inf (always walk)", replace(tuned, xi=math.inf)),
        test.evaluate("THI, xi = -inf (rank 1 only)", replace(tuned, xi=-math.inf)),
        test.evaluate(
            "THI, perfect verifier", replace(tuned, yes_threshold=0.5), test.perfect_p_yes()
        ),
    ]
    costs = {}
    lazy = replace(tuned, schedule="lean", walk="lazy")
    for name, params, at_enrolment in (
        ("lean, lazy walk (default)", lazy, False),
        ("lean, lazy walk, VQA at enrolment", lazy, True),
        ("lean, batched check", replace(tuned, schedule="lean", walk="batched"), False),
        ("reference (paper's schedule)", replace(tuned, schedule="reference"), False),
    ):
        cost = engine_cost(test, backend, params, at_enrolment)
        replayed = test.anchors(params)
        if not np.array_equal(cost.anchors, replayed):
            raise AssertionError(f"{name}: the engine's anchors differ from the replay")
        costs[name] = {
            "evaluations_per_query": cost.evaluations_per_query,
            "round_trips_per_query": cost.round_trips_per_query,
        }
    paper = float(test.reference_evaluations(tuned).mean())
    counted = costs["reference (paper's schedule)"]["evaluations_per_query"]
    if not math.isclose(paper, counted):
        raise AssertionError(f"the paper's schedule counts {paper} by formula, {counted} run")
    return {
        "split": split,
        "tuned_on": tune_split,
        "params": asdict(tuned),
        "tuning_limits": asdict(TuningLimits()),
        "tuned_within_limits": within_limits,
        "rows": [_row_dict(r) for r in rows],
        "costs": costs,
        "paper_schedule_evaluations_per_query": float(paper),
        "verifier_accuracy_top_k": test.candidate_accuracy(tuned.yes_threshold, tuned.candidates),
        "fits_caption_other_identity_share": test.fits_other_identity_share(tuned.candidates),
        "mllm": backend.model_key,
    }


__all__ = ["evaluate_thi", "thi_data"]
