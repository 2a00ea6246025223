"""A seeded procedural pedestrian world: identities with attributes, crops, and captions.

This is the first cut used by the demo gallery: a handful of clothing attributes drawn on a
simple body. The richer world of DESIGN.md (patterns, accessories, siblings, occlusion,
annotator-style captions, CUHK-PEDES output) grows from here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 28),
    "white": (235, 235, 230),
    "grey": (128, 128, 132),
    "red": (200, 30, 35),
    "blue": (35, 70, 190),
    "green": (40, 140, 60),
    "yellow": (230, 200, 40),
    "pink": (235, 130, 170),
    "brown": (120, 75, 40),
    "purple": (120, 50, 150),
}
HAIR_COLOURS = ("black", "brown", "grey", "yellow")
SKIN = ((240, 205, 180), (200, 150, 110), (140, 95, 60), (90, 60, 40))


@dataclass(frozen=True)
class Person:
    person_id: int
    gender: str  # "man" | "woman"
    hair: str
    long_hair: bool
    upper: str
    long_sleeves: bool
    lower: str
    lower_type: str  # "trousers" | "shorts" | "skirt"
    shoes: str
    bag: str  # "" | "backpack" | "handbag"
    bag_colour: str
    skin: int


def sample_person(rng: np.random.Generator, person_id: int) -> Person:
    names = list(COLOURS)
    gender = str(rng.choice(["man", "woman"]))
    lower_types = ["trousers", "shorts", "skirt"] if gender == "woman" else ["trousers", "shorts"]
    bag = str(rng.choice(["", "backpack", "handbag"], p=[0.5, 0.3, 0.2]))
    return Person(
        person_id=person_id,
        gender=gender,
        hair=str(rng.choice(HAIR_COLOURS)),
        long_hair=bool(rng.random() < (0.7 if gender == "woman" else 0.1)),
        upper=str(rng.choice(names)),
        long_sleeves=bool(rng.random() < 0.6),
        lower=str(rng.choice(names)),
        lower_type=str(rng.choice(lower_types)),
        shoes=str(rng.choice(["black", "white", "brown", "grey"])),
        bag=bag,
        bag_colour=str(rng.choice(names)) if bag else "",
        skin=int(rng.integers(len(SKIN))),
    )


def render(
    person: Person, rng: np.random.Generator, size: tuple[int, int] = (128, 48)
) -> np.ndarray:
    """One crop [H, W, 3] uint8 of `person` with random pose, scale, light and background."""
    h, w = size
    bg = tuple(int(c) for c in rng.integers(60, 200, size=3))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    s = h / 128 * rng.uniform(0.85, 1.0)
    cx = w / 2 + rng.uniform(-3, 3)
    top = rng.uniform(2, 8)

    def y(v: float) -> float:
        return top + v * s

    def rect(x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int]) -> None:
        d.rectangle([cx + x0 * s, y(y0), cx + x1 * s, y(y1)], fill=colour)

    col = COLOURS
    skin = SKIN[person.skin]
    if person.long_hair:
        rect(-9, 2, 9, 34, col[person.hair])
    d.ellipse([cx - 7 * s, y(4), cx + 7 * s, y(20)], fill=skin)
    d.chord([cx - 8 * s, y(1), cx + 8 * s, y(14)], 180, 360, fill=col[person.hair])
    if person.bag == "backpack":
        rect(-13, 26, 13, 56, col[person.bag_colour])
    rect(-11, 22, 11, 62, col[person.upper])
    arm = col[person.upper] if person.long_sleeves else skin
    rect(-16, 24, -11, 60, arm)
    rect(11, 24, 16, 60, arm)
    if person.lower_type == "skirt":
        d.polygon(
            [
                (cx - 10 * s, y(62)),
                (cx + 10 * s, y(62)),
                (cx + 14 * s, y(88)),
                (cx - 14 * s, y(88)),
            ],
            fill=col[person.lower],
        )
        rect(-8, 88, -2, 112, skin)
        rect(2, 88, 8, 112, skin)
    else:
        leg_end = 84 if person.lower_type == "shorts" else 112
        rect(-10, 62, -1, leg_end, col[person.lower])
        rect(1, 62, 10, leg_end, col[person.lower])
        if leg_end < 112:
            rect(-9, leg_end, -2, 112, skin)
            rect(2, leg_end, 9, 112, skin)
    rect(-10, 112, -1, 118, col[person.shoes])
    rect(1, 112, 10, 118, col[person.shoes])
    if person.bag == "handbag":
        rect(14, 50, 22, 64, col[person.bag_colour])
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))
    arr = np.asarray(img, dtype=np.float32) * rng.uniform(0.75, 1.2)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8)


def caption(person: Person, rng: np.random.Generator) -> str:
    """A caption that mentions a random subset of the attributes, in varied words."""
    who = (
        person.gender if rng.random() < 0.6 else ("person" if rng.random() < 0.5 else "pedestrian")
    )
    hair_colour = "blonde" if person.hair == "yellow" else person.hair
    hair = f"{'long' if person.long_hair else 'short'} {hair_colour} hair"
    sleeves = "long-sleeved" if person.long_sleeves else "short-sleeved"
    top = str(rng.choice(["shirt", "top", "jacket"]))
    clauses = [
        f"with {hair}",
        f"wearing a {person.upper} {sleeves} {top}"
        if rng.random() < 0.5
        else f"in a {person.upper} {top}",
        f"{person.lower} {person.lower_type}",
        f"{person.shoes} shoes",
    ]
    if person.bag:
        clauses.append(f"carrying a {person.bag_colour} {person.bag}")
    keep = [c for c in clauses if rng.random() < 0.7] or clauses[1:2]
    # Garments and shoes read as "in ..." when they open the description.
    if not keep[0].startswith(("with", "wearing", "in", "carrying")):
        keep[0] = "in " + keep[0]
    return f"A {who} " + ", ".join(keep) + "."
