"""Write a CUHK-PEDES-format dataset (reid_raw.json + imgs/) drawn from the synthetic world.

The output is byte-identical for the same (seed, ids, difficulty, images_per_id,
captions_per_image, image_size), so every experiment on it can be rebuilt from its arguments.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from icl.synthetic.captions import caption_with_mentions
from icl.synthetic.render import render
from icl.synthetic.schema import DEFAULT_DIFFICULTY, DIFFICULTIES, draw_view, sample_population

ANNOTATION_FILE = "reid_raw.json"
ATTRIBUTES_FILE = "attributes.json"
MARKER_FILE = "synthetic.json"  # says "this folder is ours" so a rewrite may clear it
IMAGE_DIR = "imgs"
SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


@dataclass(frozen=True)
class SyntheticSummary:
    json_path: Path  # reid_raw.json
    attributes_path: Path  # attributes.json
    ids: dict[str, int]  # identities per split
    images: dict[str, int]  # images per split
    captions: dict[str, int]  # captions per split


def tokens(text: str) -> list[str]:
    """Lower-cased words of a caption with punctuation stripped (hyphenated words kept)."""
    return _TOKEN.findall(text.lower())


def split_identities(ids: int, seed: int) -> dict[int, str]:
    """1-based id -> split: round(15%) test, round(10%) val, the rest train, shuffled by seed."""
    n_test, n_val = round(0.15 * ids), round(0.10 * ids)
    order = np.random.default_rng([seed, 23]).permutation(ids) + 1
    out = {int(i): "test" for i in order[:n_test]}
    out |= {int(i): "val" for i in order[n_test : n_test + n_val]}
    out |= {int(i): "train" for i in order[n_test + n_val :]}
    return out


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER_FILE).is_file():
            raise ValueError(
                f"{out} is not empty and is not a synthetic dataset (no {MARKER_FILE}); "
                "refusing to write into it"
            )
        # A previous synthetic dataset: clear what we wrote so no stale image survives.
        shutil.rmtree(out / IMAGE_DIR, ignore_errors=True)
        for name in (ANNOTATION_FILE, ATTRIBUTES_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_synthetic_dataset(
    out: Path,
    ids: int,
    seed: int,
    difficulty: str = DEFAULT_DIFFICULTY,
    images_per_id: int = 4,
    captions_per_image: int = 2,
    image_size: tuple[int, int] = (128, 48),
    *,
    progress: bool = False,
) -> SyntheticSummary:
    """Draw `ids` identities and write `out/imgs/<split>/<id:05d>_<k>.png` and the JSON files.

    `out/reid_raw.json` is the CUHK-PEDES annotation list; `out/attributes.json` maps each
    file_path to the generator's labels (attributes, view, sibling source, and the attributes
    each caption states) for analysis.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; known: {', '.join(DIFFICULTIES)}")
    if ids < 10:
        raise ValueError(f"ids must be at least 10 (test and val need identities), got {ids}")
    if images_per_id < 1 or captions_per_image < 1:
        raise ValueError("images_per_id and captions_per_image must be at least 1")
    h, w = image_size
    if h < 16 or w < 8:
        raise ValueError(f"image_size {image_size} is too small; need at least (16, 8)")
    preset = DIFFICULTIES[difficulty]
    out = Path(out)
    _prepare_out(out)
    params = {
        "generator": "icl.synthetic",
        "version": FORMAT_VERSION,
        "ids": ids,
        "seed": seed,
        "difficulty": difficulty,
        "images_per_id": images_per_id,
        "captions_per_image": captions_per_image,
        "image_size": [h, w],
    }
    (out / MARKER_FILE).write_text(json.dumps(params, indent=1) + "\n")

    people, sibling_of = sample_population(
        np.random.default_rng([seed, 17]), ids, preset.sibling_fraction
    )
    split_of = split_identities(ids, seed)
    for split in SPLITS:
        (out / IMAGE_DIR / split).mkdir(parents=True, exist_ok=True)

    records: list[dict] = []
    labels: dict[str, dict] = {}
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress()
        bar.start()
        task = bar.add_task(f"rendering {ids * images_per_id} images", total=ids * images_per_id)
    try:
        for person in people:
            pid = person.person_id
            split = split_of[pid]
            for k in range(images_per_id):
                # One stream per image: an image does not depend on how many came before.
                rng = np.random.default_rng([seed, 31, pid, k])
                view = draw_view(rng)
                pixels = render(person, rng, (h, w), view=view, jitter=preset.jitter)
                rel = f"{split}/{pid:05d}_{k}.png"
                (out / IMAGE_DIR / rel).write_bytes(_png(pixels))
                written = [
                    caption_with_mentions(
                        person, rng, view=view, mention_range=preset.mention_range
                    )
                    for _ in range(captions_per_image)
                ]
                caps = [text for text, _ in written]
                records.append(
                    {
                        "split": split,
                        "captions": caps,
                        "file_path": rel,
                        "id": pid,
                        "processed_tokens": [tokens(c) for c in caps],
                    }
                )
                labels[rel] = {
                    **person.attributes(),
                    "view": view,
                    "sibling_of": sibling_of.get(pid),
                    # What each caption states, for analysis (e.g. which other identities
                    # fit a caption); no model reads it.
                    "mentions": [mentions for _, mentions in written],
                }
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()

    json_path = out / ANNOTATION_FILE
    json_path.write_text(json.dumps(records) + "\n")
    attributes_path = out / ATTRIBUTES_FILE
    attributes_path.write_text(json.dumps(labels, indent=1) + "\n")
    count = {s: 0 for s in SPLITS}
    for s in split_of.values():
        count[s] += 1
    images = {s: count[s] * images_per_id for s in SPLITS}
    return SyntheticSummary(
        json_path=json_path,
        attributes_path=attributes_path,
        ids=count,
        images=images,
        captions={s: n * captions_per_image for s, n in images.items()},
    )
