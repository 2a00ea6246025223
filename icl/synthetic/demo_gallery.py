"""The demo gallery: crops of synthetic identities seen by several cameras over a day."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from icl.images import encode_png
from icl.synthetic.captions import caption
from icl.synthetic.render import render
from icl.synthetic.schema import Person, sample_person

DAY_START_MS = 1_767_600_000_000  # 2026-01-05 08:00 UTC: a fixed, reproducible day
CAMERAS = tuple(f"cam-{i:02d}" for i in range(1, 7))


@dataclass(frozen=True)
class DemoImage:
    image_id: str
    camera_id: str
    captured_at_ms: int
    track_id: str
    person: Person
    png: bytes


def demo_gallery(n_images: int, seed: int = 0, images_per_person: int = 3) -> Iterator[DemoImage]:
    """Yield `n_images` crops, `images_per_person` per identity, deterministic per seed."""
    # Identities and renders draw from separate streams, so demo_queries can rebuild the
    # identities without rendering.
    people_rng = np.random.default_rng(seed)
    rng = np.random.default_rng([seed, 1])
    person = sample_person(people_rng, 0)
    for i in range(n_images):
        pid, shot = divmod(i, images_per_person)
        if shot == 0 and pid > 0:
            person = sample_person(people_rng, pid)
        camera = CAMERAS[int(rng.integers(len(CAMERAS)))]
        yield DemoImage(
            image_id=f"p{pid:05d}-{shot}",
            camera_id=camera,
            captured_at_ms=DAY_START_MS + int(rng.integers(0, 10 * 3600 * 1000)),
            track_id=f"t{pid:05d}-{camera}",
            person=person,
            png=encode_png(render(person, rng)),
        )


def demo_queries(seed: int = 0, count: int = 3) -> list[str]:
    """Captions of the first identities of the gallery with the same seed."""
    people_rng = np.random.default_rng(seed)
    people = [sample_person(people_rng, i) for i in range(count)]
    return [caption(p, np.random.default_rng([seed, 2, p.person_id])) for p in people]
