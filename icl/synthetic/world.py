"""A seeded procedural pedestrian world: identities with attributes, crops, and captions.

Every identity is a `Person` drawn from an explicit attribute schema (`ATTRIBUTES`), so that
later models (attribute VQA, caption parsers) can ask about exactly the same attributes the
generator used. `render` draws one camera's view of a person with pose, scale, lighting,
blur, noise, clutter and occlusion changes; `caption` writes what an annotator looking at that
view might write, mentioning a random subset of the attributes in varied words. Everything is
a pure function of the numpy Generator passed in, so datasets are reproducible per seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ---------------------------------------------------------------------------------------------
# Schema

NONE = "none"
RGB = tuple[int, int, int]

# Eleven colours picked to stay apart under the per-camera light and colour casts.
COLOURS: dict[str, RGB] = {
    "black": (25, 25, 28),
    "white": (238, 238, 232),
    "grey": (128, 128, 132),
    "red": (205, 30, 35),
    "orange": (240, 128, 20),
    "yellow": (235, 210, 40),
    "green": (40, 150, 60),
    "blue": (35, 75, 200),
    "purple": (125, 50, 160),
    "pink": (240, 140, 185),
    "brown": (125, 78, 40),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
HAIR_COLOURS: dict[str, RGB] = {
    "black": (20, 18, 18),
    "brown": (100, 62, 32),
    "blonde": (225, 195, 120),
    "grey": (172, 172, 174),
}
SHOE_COLOURS = ("black", "white", "grey", "brown", "red", "blue")
JEANS_COLOURS = ("blue", "black", "grey", "white")
SKIN: tuple[RGB, ...] = ((240, 205, 180), (215, 170, 130), (170, 115, 75), (100, 66, 44))
BUILDS = (0.92, 1.0, 1.08)  # shoulder-width factors; an identity trait, not an attribute

# The attribute schema, in the order a question-asking model should use. A value of "none"
# means absent (no bag) or not applicable (hair colour of a bald man, lower garment under a
# dress); such values are never mentioned in captions, except the rare "no bag"-style remark.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "gender": ("man", "woman"),
    "hair_length": ("short", "long", "bald"),
    "hair_colour": (*HAIR_COLOURS, NONE),
    "upper_type": ("t-shirt", "shirt", "jacket", "coat", "hoodie", "dress"),
    "upper_colour": COLOUR_NAMES,
    "sleeve_length": ("short", "long"),
    "upper_pattern": ("plain", "stripes", "checked", "logo"),
    "lower_type": ("trousers", "jeans", "shorts", "skirt", NONE),
    "lower_colour": (*COLOUR_NAMES, NONE),
    "lower_length": ("long", "short"),
    "shoe_type": ("sneakers", "boots", "leather shoes", "sandals"),
    "shoe_colour": SHOE_COLOURS,
    "bag": (NONE, "backpack", "handbag", "shoulder bag"),
    "bag_colour": (*COLOUR_NAMES, NONE),
    "hat": (NONE, "cap", "beanie"),
    "hat_colour": (*COLOUR_NAMES, NONE),
    "glasses": (NONE, "glasses", "sunglasses"),
    "scarf": (NONE, *COLOUR_NAMES),
    "held_object": (NONE, "phone", "umbrella", "cup", "shopping bag"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(ATTRIBUTES)
# Attributes whose value is a colour name (COLOUR_NAMES or HAIR_COLOURS).
COLOUR_ATTRIBUTES = frozenset(
    {"hair_colour", "upper_colour", "lower_colour", "shoe_colour", "bag_colour", "hat_colour"}
    | {"scarf"}
)

VIEWS = ("front", "back", "side")
VIEW_P = (0.4, 0.35, 0.25)


@dataclass(frozen=True)
class Person:
    person_id: int
    gender: str
    hair_length: str
    hair_colour: str
    upper_type: str
    upper_colour: str
    sleeve_length: str
    upper_pattern: str
    lower_type: str
    lower_colour: str
    lower_length: str
    shoe_type: str
    shoe_colour: str
    bag: str
    bag_colour: str
    hat: str
    hat_colour: str
    glasses: str
    scarf: str
    held_object: str
    skin: int = 0  # index into SKIN: identity look, not an annotated attribute
    build: int = 1  # index into BUILDS

    def attributes(self) -> dict[str, str]:
        """The annotated attributes, in schema order."""
        return {a: getattr(self, a) for a in ATTRIBUTE_NAMES}


assert [f.name for f in fields(Person)][1 : 1 + len(ATTRIBUTE_NAMES)] == list(ATTRIBUTE_NAMES)


@dataclass(frozen=True)
class Difficulty:
    sibling_fraction: float  # share of identities that copy another with 2 attributes changed
    mention_range: tuple[float, float]  # share of visible attributes a caption mentions
    jitter: float  # scales pose, scale, light, blur, noise, clutter and occlusion


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty(0.0, (0.40, 0.70), 0.6),
    "medium": Difficulty(0.3, (0.35, 0.60), 1.0),
    "hard": Difficulty(0.5, (0.30, 0.50), 1.3),
}
DEFAULT_DIFFICULTY = "medium"


def check_person(p: Person) -> list[str]:
    """Why `p` is implausible or outside the schema; empty when it is a valid person."""
    bad = [f"{a}={v!r}" for a, v in p.attributes().items() if v not in ATTRIBUTES[a]]
    if bad:
        return [f"value outside the schema: {b}" for b in bad]
    rules = [
        (p.upper_type == "dress" or p.lower_type != "skirt" or p.gender == "woman", "skirt"),
        (p.upper_type != "dress" or p.gender == "woman", "dress on a man"),
        (p.hair_length != "bald" or p.gender == "man", "bald woman"),
        ((p.hair_length == "bald") == (p.hair_colour == NONE), "hair colour vs bald"),
        ((p.upper_type == "dress") == (p.lower_type == NONE), "dress vs lower garment"),
        ((p.lower_type == NONE) == (p.lower_colour == NONE), "lower colour vs lower type"),
        (p.lower_type not in ("trousers", "jeans") or p.lower_length == "long", "short trousers"),
        (p.lower_type != "shorts" or p.lower_length == "short", "long shorts"),
        (p.upper_type not in ("jacket", "coat", "hoodie") or p.sleeve_length == "long", "sleeves"),
        (p.upper_type != "dress" or p.upper_pattern != "logo", "logo on a dress"),
        (p.lower_type != "jeans" or p.lower_colour in JEANS_COLOURS, "jeans colour"),
        ((p.bag == NONE) == (p.bag_colour == NONE), "bag colour vs bag"),
        ((p.hat == NONE) == (p.hat_colour == NONE), "hat colour vs hat"),
        (0 <= p.skin < len(SKIN) and 0 <= p.build < len(BUILDS), "skin or build index"),
    ]
    return [why for ok, why in rules if not ok]


def _pick(rng: np.random.Generator, values: Sequence[str], p: Sequence[float] | None = None) -> str:
    if p is None:
        return values[int(rng.integers(len(values)))]
    return values[int(rng.choice(len(values), p=np.asarray(p) / np.sum(p)))]


def sample_person(rng: np.random.Generator, person_id: int) -> Person:
    """A random plausible person; deterministic given the state of `rng`."""
    gender = _pick(rng, ("man", "woman"))
    woman = gender == "woman"
    if woman:
        hair_length = _pick(rng, ("short", "long"), (0.3, 0.7))
    else:
        hair_length = _pick(rng, ("short", "long", "bald"), (0.8, 0.08, 0.12))
    hair_colour = NONE if hair_length == "bald" else _pick(rng, tuple(HAIR_COLOURS))
    uppers = ("t-shirt", "shirt", "jacket", "coat", "hoodie") + (("dress",) if woman else ())
    upper_type = _pick(rng, uppers, (0.26, 0.2, 0.2, 0.12, 0.14, 0.1)[: len(uppers)])
    if upper_type in ("jacket", "coat", "hoodie"):
        sleeve = "long"
    else:
        sleeve = _pick(rng, ("short", "long"), (0.75, 0.25) if upper_type == "t-shirt" else None)
    patterns = ("plain", "stripes", "checked") + (("logo",) if upper_type != "dress" else ())
    pattern = _pick(rng, patterns, (0.55, 0.16, 0.14, 0.15)[: len(patterns)])
    if upper_type == "dress":
        lower_type, lower_colour = NONE, NONE
        lower_length = _pick(rng, ("long", "short"))
    else:
        lowers = ("trousers", "jeans", "shorts") + (("skirt",) if woman else ())
        lower_type = _pick(rng, lowers, (0.38, 0.3, 0.16, 0.16)[: len(lowers)])
        colours = JEANS_COLOURS if lower_type == "jeans" else COLOUR_NAMES
        lower_colour = _pick(rng, colours)
        lower_length = {"trousers": "long", "jeans": "long", "shorts": "short"}.get(
            lower_type
        ) or _pick(rng, ("long", "short"))
    bag = _pick(rng, ATTRIBUTES["bag"], (0.4, 0.25, 0.2 if woman else 0.05, 0.15))
    hat = _pick(rng, ATTRIBUTES["hat"], (0.7, 0.17, 0.13))
    return Person(
        person_id=person_id,
        gender=gender,
        hair_length=hair_length,
        hair_colour=hair_colour,
        upper_type=upper_type,
        upper_colour=_pick(rng, COLOUR_NAMES),
        sleeve_length=sleeve,
        upper_pattern=pattern,
        lower_type=lower_type,
        lower_colour=lower_colour,
        lower_length=lower_length,
        shoe_type=_pick(rng, ATTRIBUTES["shoe_type"], (0.4, 0.2, 0.25, 0.15)),
        shoe_colour=_pick(rng, SHOE_COLOURS),
        bag=bag,
        bag_colour=NONE if bag == NONE else _pick(rng, COLOUR_NAMES),
        hat=hat,
        hat_colour=NONE if hat == NONE else _pick(rng, COLOUR_NAMES),
        glasses=_pick(rng, ATTRIBUTES["glasses"], (0.65, 0.2, 0.15)),
        scarf=NONE if rng.random() < 0.8 else _pick(rng, COLOUR_NAMES),
        held_object=_pick(rng, ATTRIBUTES["held_object"], (0.6, 0.12, 0.1, 0.09, 0.09)),
        skin=int(rng.integers(len(SKIN))),
        build=int(rng.integers(len(BUILDS))),
    )


def attribute_diff(a: Person, b: Person) -> list[str]:
    """The attributes (schema names) on which `a` and `b` differ."""
    return [n for n in ATTRIBUTE_NAMES if getattr(a, n) != getattr(b, n)]


def make_sibling(source: Person, rng: np.random.Generator, person_id: int) -> Person:
    """A near-duplicate of `source`: the same look with exactly two attributes changed."""
    for _ in range(10_000):
        a, b = (ATTRIBUTE_NAMES[i] for i in rng.choice(len(ATTRIBUTE_NAMES), 2, replace=False))
        va = _pick(rng, [v for v in ATTRIBUTES[a] if v != getattr(source, a)])
        vb = _pick(rng, [v for v in ATTRIBUTES[b] if v != getattr(source, b)])
        cand = replace(source, person_id=person_id, **{a: va, b: vb})
        if not check_person(cand):
            return cand
    raise RuntimeError("no valid sibling found")  # unreachable for the schema above


def sample_population(
    rng: np.random.Generator, n: int, sibling_fraction: float, first_id: int = 1
) -> tuple[list[Person], dict[int, int]]:
    """`n` people with ids first_id.. and a map sibling id -> source id.

    round(sibling_fraction * n) identities are siblings of a random non-sibling identity, so
    a retrieval model must read the small differences, not only the overall look.
    """
    people = [sample_person(rng, first_id + i) for i in range(n)]
    n_sib = min(round(sibling_fraction * n), n - 1)
    order = rng.permutation(n)
    siblings, sources = order[:n_sib], order[n_sib:]
    sibling_of: dict[int, int] = {}
    for i in sorted(int(i) for i in siblings):
        src = people[int(sources[int(rng.integers(len(sources)))])]
        people[i] = make_sibling(src, rng, first_id + i)
        sibling_of[first_id + i] = src.person_id
    return people, sibling_of


def visible_attributes(person: Person, view: str | None) -> list[str]:
    """The attributes an annotator can see on `view` (None: all), "none" values included."""
    hidden: set[str] = set()
    if view == "back":
        hidden.add("glasses")  # the face is turned away
        if person.upper_pattern == "logo":
            hidden.add("upper_pattern")  # prints are on the front
    return [a for a in ATTRIBUTE_NAMES if a not in hidden]


def draw_view(rng: np.random.Generator) -> str:
    return VIEWS[int(rng.choice(len(VIEWS), p=VIEW_P))]


# ---------------------------------------------------------------------------------------------
# Rendering. Body coordinates are "units": x in [-24, 24] around the body axis, y in [0, 128]
# from the top of the head area to the ground, for a 128x48 crop; other sizes scale them.


def _shade(c: RGB, f: float) -> RGB:
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(a[i] * (1 - t) + b[i] * t) for i in range(3))  # type: ignore[return-value]


def _contrast(name: str) -> RGB:
    return (35, 35, 40) if name in ("white", "yellow", "pink", "orange") else (240, 240, 236)


class _Painter:
    """Draws in body units onto a PIL image (the scale and offset carry the jitter)."""

    def __init__(self, img: Image.Image, cx: float, top: float, sx: float, sy: float) -> None:
        self.d = ImageDraw.Draw(img)
        self.cx, self.top, self.sx, self.sy = cx, top, sx, sy

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + x * self.sx, self.top + y * self.sy)

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        ax, ay = self.pt(min(x0, x1), min(y0, y1))
        bx, by = self.pt(max(x0, x1), max(y0, y1))
        return [ax, ay, bx, by]

    def rect(self, x0: float, y0: float, x1: float, y1: float, c: RGB) -> None:
        self.d.rectangle(self.box(x0, y0, x1, y1), fill=c)

    def ell(self, x0: float, y0: float, x1: float, y1: float, c: RGB) -> None:
        self.d.ellipse(self.box(x0, y0, x1, y1), fill=c)

    def chord(self, x0: float, y0: float, x1: float, y1: float, a0: float, a1: float, c: RGB):
        self.d.chord(self.box(x0, y0, x1, y1), a0, a1, fill=c)

    def poly(self, pts: Sequence[tuple[float, float]], c: RGB) -> None:
        self.d.polygon([self.pt(x, y) for x, y in pts], fill=c)

    def line(self, pts: Sequence[tuple[float, float]], c: RGB, width: float) -> None:
        self.d.line([self.pt(x, y) for x, y in pts], fill=c, width=max(1, round(width * self.sx)))


def _background(rng: np.random.Generator, h: int, w: int, jitter: float) -> Image.Image:
    """A street-like backdrop: a wall gradient, a ground band and desaturated clutter."""
    grey = np.array([128.0, 128.0, 128.0])
    wall = rng.uniform(40, 220, 3) * 0.5 + grey * 0.5 * rng.uniform(0.5, 1.5)
    wall2 = wall * rng.uniform(0.6, 1.3)
    ground = rng.uniform(60, 170, 3) * 0.4 + grey * 0.6 * rng.uniform(0.6, 1.3)
    t = np.linspace(0.0, 1.0, h)[:, None]
    rows = wall[None, :] * (1 - t) + wall2[None, :] * t
    horizon = int(h * rng.uniform(0.72, 0.92))
    rows[horizon:] = ground
    arr = np.broadcast_to(np.clip(rows, 0, 255).astype(np.uint8)[:, None, :], (h, w, 3))
    img = Image.fromarray(np.ascontiguousarray(arr))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 4 + round(6 * jitter)))):
        c = rng.uniform(20, 235, 3)
        sat = rng.uniform(0.25, 0.85)
        col = tuple(int(v) for v in c * sat + grey * (1 - sat))
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 0.95) * h
        kind = rng.random()
        if kind < 0.4:  # poles, door frames
            d.rectangle([x0, y0, x0 + rng.uniform(1, 0.15 * w), y0 + rng.uniform(0.2, 1) * h], col)
        elif kind < 0.7:  # windows, signs, parked things
            d.rectangle([x0, y0, x0 + rng.uniform(4, 0.6 * w), y0 + rng.uniform(4, 0.3 * h)], col)
        elif kind < 0.9:  # bushes, blobs
            d.ellipse([x0, y0, x0 + rng.uniform(4, 0.5 * w), y0 + rng.uniform(4, 0.25 * h)], col)
        else:
            d.line([x0, y0, rng.uniform(0, w), rng.uniform(0, h)], col, int(rng.integers(1, 3)))
    return img


def _occluder(d: ImageDraw.ImageDraw, rng: np.random.Generator, h: int, w: int) -> None:
    """A box from the bottom or a side, or part of another passer-by at an edge."""
    col = tuple(int(v) for v in rng.uniform(30, 220, 3))
    kind = rng.random()
    if kind < 0.4:  # bench, bin, car bonnet
        d.rectangle([rng.uniform(-0.3, 0.3) * w, h * rng.uniform(0.7, 0.85), w * 1.3, h], col)
    elif kind < 0.6:  # a sign or a pillar at one side
        x = w * rng.uniform(0.12, 0.3)
        box = [0, h * rng.uniform(0, 0.4), x, h] if rng.random() < 0.5 else [w - x, 0, w, h]
        d.rectangle(box, col)
    else:  # someone else crossing at the edge
        left = rng.random() < 0.5
        bw = w * rng.uniform(0.3, 0.45)
        x0 = -bw * rng.uniform(0.3, 0.6) if left else w - bw * rng.uniform(0.4, 0.7)
        y0 = h * rng.uniform(0.05, 0.15)
        skin = SKIN[int(rng.integers(len(SKIN)))]
        lower = tuple(int(v) for v in rng.uniform(20, 200, 3))
        d.ellipse([x0 + bw * 0.3, y0, x0 + bw * 0.7, y0 + h * 0.13], skin)
        d.rectangle([x0 + bw * 0.3, y0 + h * 0.5, x0 + bw * 0.7, h], lower)
        d.rectangle([x0, y0 + h * 0.13, x0 + bw, y0 + h * 0.52], col)


def render(
    person: Person,
    rng: np.random.Generator,
    size: tuple[int, int] = (128, 48),
    *,
    view: str | None = None,
    jitter: float = 1.0,
) -> np.ndarray:
    """One crop [H, W, 3] uint8 of `person` seen from `view` (drawn from `rng` when None).

    `jitter` scales the per-image nuisance: pose, scale and position, camera light and colour
    cast, blur, low resolution, noise, background clutter and occlusion (DIFFICULTIES).
    """
    h, w = size
    if view is None:
        view = draw_view(rng)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; known: {', '.join(VIEWS)}")
    j = float(jitter)
    img = _background(rng, h, w, j)
    k = rng.uniform(max(0.7, 1 - 0.15 * j), 1.0)
    sx, sy = w / 48 * k, h / 128 * k
    cx = w / 2 + rng.uniform(-3.0, 3.0) * j * w / 48
    top = (h - 120 * sy) * rng.uniform(0.15, 0.85)
    pa = _Painter(img, cx, top, sx, sy)
    pose = (rng.uniform(-1, 1) * j, rng.uniform(0, 1), rng.uniform(-1, 1) * j)
    if view == "side":
        _draw_side(pa, person, pose)
    else:
        _draw_frontal(pa, person, pose, back=view == "back")
    if rng.random() < 0.15 * j:
        _occluder(pa.d, rng, h, w)
    if rng.random() < 0.3 * j:  # a distant or low-quality camera
        f = rng.uniform(0.45, 0.8)
        small = img.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.BILINEAR)
        img = small.resize((w, h), Image.Resampling.BILINEAR)
    radius = rng.uniform(0.0, 0.9 * j)
    if radius > 0.3:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    arr = np.asarray(img, dtype=np.float32)
    # Camera: global gain, a colour cast, a side-light ramp, and sensor noise.
    gain = rng.uniform(1 - 0.25 * j, 1 + 0.2 * j)
    cast = 1 + rng.uniform(-0.08, 0.08, 3) * j
    ramp = 1 + rng.uniform(-0.15, 0.15) * j * np.linspace(-1, 1, w, dtype=np.float32)
    arr = arr * (gain * cast).astype(np.float32)[None, None, :] * ramp[None, :, None]
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(1, 5) * j)
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(np.clip(arr, 0, 255).astype(np.uint8))


def _upper_details(pa: _Painter, p: Person, sw: float, bottom: float, back: bool) -> None:
    """Pattern and garment-type cues on a frontal torso spanning x in [-sw, sw]."""
    base = COLOURS[p.upper_colour]
    con = _contrast(p.upper_colour)
    x0, x1 = -sw + 1, sw - 1
    if p.upper_pattern == "stripes":
        y = 33.0
        while y < bottom - 1:
            pa.rect(x0, y, x1, y + 1.8, con)
            y += 5.0
    elif p.upper_pattern == "checked":
        half = _mix(base, con, 0.55)
        y = 33.0
        while y < bottom - 1:
            pa.rect(x0, y, x1, y + 1.2, half)
            y += 4.5
        x = x0 + 1.5
        while x < x1:
            pa.rect(x, 31, x + 1.2, bottom - 1, half)
            x += 4.5
    elif p.upper_pattern == "logo" and not back:
        pa.rect(-4.5, 37, 4.5, 46, con)
        pa.ell(-2.5, 39, 2.5, 44, base)
    dark = _shade(base, 0.6)
    t = p.upper_type
    if back:
        if t == "hoodie":
            pa.chord(-7, 26, 7, 44, 0, 180, dark)
        elif t in ("shirt", "jacket", "coat"):
            pa.rect(-5, 29, 5, 31.5, dark)
        return
    if t == "t-shirt":
        pa.chord(-3.5, 26, 3.5, 34, 0, 180, SKIN[p.skin])
    elif t == "shirt":
        pa.poly([(-4.5, 29), (0, 35), (-1, 29)], (235, 235, 235))
        pa.poly([(4.5, 29), (0, 35), (1, 29)], (235, 235, 235))
        pa.rect(-0.5, 35, 0.5, bottom - 1, dark)
    elif t == "jacket":
        pa.rect(-0.8, 31, 0.8, bottom, dark)
        pa.rect(-6, 29, 6, 32, dark)
    elif t == "coat":
        pa.poly([(-6, 29), (0, 42), (-2, 48)], dark)
        pa.poly([(6, 29), (0, 42), (2, 48)], dark)
        for y in (52.0, 60.0, 68.0, 76.0):
            pa.ell(-3, y, -1.5, y + 1.5, (20, 20, 20))
            pa.ell(1.5, y, 3, y + 1.5, (20, 20, 20))
    elif t == "hoodie":
        pa.chord(-7.5, 24, 7.5, 36, 0, 180, dark)
        pa.rect(-6, 54, 6, 63, dark)
        pa.line([(-2, 33), (-2, 42)], (235, 235, 235), 0.8)
        pa.line([(2, 33), (2, 42)], (235, 235, 235), 0.8)


def _shoe(pa: _Painter, p: Person, fx: float, forward: float) -> None:
    """A shoe at foot x `fx`; `forward` > 0 extends the toe to +x (side view)."""
    c = COLOURS[p.shoe_colour]
    x0, x1 = fx - 4.2 + min(0.0, forward), fx + 4.2 + max(0.0, forward)
    t = p.shoe_type
    if t == "boots":
        pa.rect(fx - 4.2, 99, fx + 4.2, 110, c)
        pa.rect(x0, 108, x1, 114, c)
    elif t == "sandals":
        pa.rect(x0, 108, x1, 113, SKIN[p.skin])
        pa.rect(x0, 108.5, x1, 110, c)
        pa.rect(x0, 112.5, x1, 114.5, c)
    elif t == "sneakers":
        pa.rect(x0, 107, x1, 113, c)
        pa.rect(x0, 112, x1, 114.5, (170, 170, 170) if p.shoe_colour == "white" else (235,) * 3)
    else:  # leather shoes: low, slim and glossy
        pa.rect(x0, 109, x1, 114, c)
        pa.rect(fx - 1.5, 109.5, fx + 0.5, 110.5, _shade(c, 1.6) if c[0] > 40 else (110,) * 3)


def _legs(
    pa: _Painter, p: Person, feet: Sequence[tuple[float, float]], lw: float, toe: float = 0.0
) -> None:
    """Skin legs, then the lower garment, then shoes; feet = [(hip_x, foot_x), ...]."""
    skin = SKIN[p.skin]
    for hx, fx in feet:
        pa.line([(hx, 64), (fx, 109)], skin, lw)
    if p.lower_type in ("trousers", "jeans", "shorts"):
        c = COLOURS[p.lower_colour]
        end = 107.5 if p.lower_type != "shorts" else 84.0
        pa.rect(-8.5, 62, 8.5, 71, c)
        for hx, fx in feet:
            t = (end - 64) / 45
            pa.line([(hx, 64), (hx + (fx - hx) * t, end)], c, lw + 0.6)
            if p.lower_type == "jeans":  # faded knees and a seam tell denim from cloth
                kx = hx + (fx - hx) * 0.5
                pa.rect(kx - 1.6, 84, kx + 1.6, 90, _mix(c, (200, 200, 220), 0.35))
    for _, fx in feet:
        _shoe(pa, p, fx, toe)


def _skirt(pa: _Painter, p: Person, top_y: float, spread: float, lean: float) -> None:
    colour = p.upper_colour if p.upper_type == "dress" else p.lower_colour
    hem = 102.0 if p.lower_length == "long" else 84.0
    pa.poly(
        [(-8.5, top_y), (8.5, top_y), (11 + spread + lean, hem), (-11 - spread + lean, hem)],
        COLOURS[colour],
    )


def _head(pa: _Painter, p: Person, view: str, hx: float) -> None:
    skin, hair = SKIN[p.skin], HAIR_COLOURS.get(p.hair_colour, (0, 0, 0))
    bald = p.hair_length == "bald"
    pa.rect(hx - 2.8, 24, hx + 2.8, 31, skin)  # neck
    if view == "back":
        pa.ell(hx - 6.5, 10, hx + 6.5, 26, skin if bald else hair)
        if not bald and p.hair_length == "long":
            pa.rect(hx - 7, 17, hx + 7, 46, hair)
            pa.ell(hx - 7, 40, hx + 7, 49, hair)
        return
    pa.ell(hx - 6.5, 10, hx + 6.5, 26, skin)
    if view == "side":  # facing +x: hair on the crown and the back of the head
        if not bald:
            pa.chord(hx - 7, 8.5, hx + 7, 24, 180, 360, hair)
            pa.chord(hx - 7, 9, hx + 4, 25, 90, 270, hair)
            if p.hair_length == "long":
                pa.rect(hx - 7.5, 14, hx - 2.5, 44, hair)
        pa.rect(hx + 2.5, 17.5, hx + 3.7, 18.8, (30, 25, 25))
        if p.glasses != NONE:
            lens = (15, 15, 18) if p.glasses == "sunglasses" else (175, 200, 215)
            pa.rect(hx + 1.3, 16.3, hx + 6.3, 20.6, (20, 20, 20))
            pa.rect(hx + 2.1, 17.1, hx + 5.5, 19.8, lens)
            pa.line([(hx - 2.5, 17.5), (hx + 1.5, 17.5)], (20, 20, 20), 0.9)
        return
    if not bald:
        pa.chord(hx - 7, 8.5, hx + 7, 24, 180, 360, hair)
        if p.hair_length == "long":  # strands over the shoulders, in front of the torso
            pa.rect(hx - 8.5, 14, hx - 4.6, 44, hair)
            pa.rect(hx + 4.6, 14, hx + 8.5, 44, hair)
    for ex in (-2.7, 1.5):
        pa.rect(hx + ex, 17.8, hx + ex + 1.2, 19, (30, 25, 25))
    if p.glasses != NONE:
        lens = (15, 15, 18) if p.glasses == "sunglasses" else (175, 200, 215)
        pa.rect(hx - 6.2, 16.2, hx + 6.2, 20.8, (20, 20, 20))
        pa.rect(hx - 5.2, 17.1, hx - 0.9, 19.9, lens)
        pa.rect(hx + 0.9, 17.1, hx + 5.2, 19.9, lens)


def _hat(pa: _Painter, p: Person, view: str, hx: float) -> None:
    if p.hat == NONE:
        return
    c = COLOURS[p.hat_colour]
    if p.hat == "cap":
        pa.chord(hx - 7.3, 6.5, hx + 7.3, 22, 180, 360, c)
        if view == "side":
            pa.rect(hx + 3, 12.5, hx + 12, 15, _shade(c, 0.85))
        elif view == "front":
            pa.rect(hx - 8, 12.5, hx + 8, 15.5, _shade(c, 0.85))
    else:  # beanie: taller, rounded, with a folded band
        pa.ell(hx - 7.3, 3.5, hx + 7.3, 20, c)
        pa.rect(hx - 7.6, 12.5, hx + 7.6, 16.5, _shade(c, 0.8))


def _scarf(pa: _Painter, p: Person, view: str, hx: float) -> None:
    if p.scarf == NONE:
        return
    c = COLOURS[p.scarf]
    pa.rect(hx - 7, 25.5, hx + 7, 31.5, c)
    if view == "front":
        pa.rect(hx + 1.5, 30, hx + 5.5, 47, c)
    elif view == "side":
        pa.rect(hx + 3, 30, hx + 7, 45, c)


def _held(pa: _Painter, p: Person, hand: tuple[float, float]) -> None:
    hx, hy = hand
    o = p.held_object
    if o == "phone":
        pa.rect(hx - 2.3, hy - 2, hx + 2.3, hy + 6, (25, 25, 30))
        pa.rect(hx - 1.4, hy - 1, hx + 1.4, hy + 4.6, (150, 190, 235))
    elif o == "cup":
        pa.rect(hx - 2.8, hy - 6, hx + 2.8, hy + 2, (240, 240, 240))
        pa.rect(hx - 2.8, hy - 3.5, hx + 2.8, hy - 0.5, (150, 100, 60))
        pa.rect(hx - 3.2, hy - 7, hx + 3.2, hy - 5.5, (40, 40, 40))
    elif o == "shopping bag":
        pa.line([(hx - 3, hy + 3), (hx, hy - 0.5), (hx + 3, hy + 3)], (90, 70, 50), 0.8)
        pa.rect(hx - 6, hy + 2.5, hx + 6, hy + 16, (205, 170, 115))
        pa.rect(hx - 6, hy + 2.5, hx + 6, hy + 4, (160, 125, 80))


def _umbrella(pa: _Painter, hand: tuple[float, float]) -> None:
    hx, hy = hand
    pa.line([(hx, hy), (hx, 3)], (40, 40, 40), 1.0)
    pa.chord(hx - 17, -3, hx + 17, 17, 180, 360, (30, 32, 45))
    pa.line([(hx, hy), (hx + 2, hy + 2.5)], (40, 40, 40), 1.0)


def _arm(
    pa: _Painter, p: Person, shoulder: tuple[float, float], hand: tuple[float, float], aw: float
) -> None:
    skin, c = SKIN[p.skin], COLOURS[p.upper_colour]
    pa.line([shoulder, hand], skin, aw)
    frac = 0.9 if p.sleeve_length == "long" else 0.38
    sx, sy = shoulder
    end = (sx + (hand[0] - sx) * frac, sy + (hand[1] - sy) * frac)
    pa.line([shoulder, end], c, aw + 0.5)
    pa.ell(hand[0] - 2.2, hand[1] - 2.2, hand[0] + 2.2, hand[1] + 2.2, skin)


def _hand_at(shoulder: tuple[float, float], angle: float, length: float = 32.0):
    return (shoulder[0] + length * math.sin(angle), shoulder[1] + length * math.cos(angle))


def _draw_frontal(pa: _Painter, p: Person, pose: tuple[float, float, float], back: bool) -> None:
    """Front or back view. On the back the face is hidden and a backpack shows whole."""
    swing, spread, stance = pose
    woman = p.gender == "woman"
    sw = (9.5 if woman else 11.0) * BUILDS[p.build]
    lw = 6.5 if woman else 7.5
    side = 1.0 if back else -1.0  # +x side of the held object (the person's right hand)
    col = COLOURS[p.upper_colour]
    # Hands: lateral spread plus a forward/back swing that foreshortens the arm.
    arm_len = 32 * (1 - 0.12 * abs(swing))
    sh_r, sh_l = (side * (sw - 1.5), 32.0), (-side * (sw - 1.5), 32.0)
    out = 0.12 + 0.2 * spread
    hand_r = _hand_at(sh_r, side * out, arm_len)
    hand_l = _hand_at(sh_l, -side * out, arm_len * (1 - 0.1 * swing))
    if p.held_object == "umbrella":
        hand_r = (sh_r[0] + side * 6, 44.0)
    feet = [(-4.2, -4.2 - 1.5 * stance - 1), (4.2, 4.2 + 1.5 * stance + 1)]
    if back and p.bag == "backpack":  # the top of the pack above the shoulders
        pa.rect(-8, 30, 8, 34, _shade(COLOURS[p.bag_colour], 0.8))
    _legs(pa, p, feet, lw)
    if p.upper_type == "dress" or p.lower_type == "skirt":
        _skirt(pa, p, 60 if p.upper_type == "dress" else 63, 0.8 * stance, 0)
    bottom = {"coat": 88.0, "dress": 62.0, "jacket": 69.0}.get(p.upper_type, 67.0)
    hem = sw + (2.0 if p.upper_type == "coat" else -1.5)
    pa.poly([(-sw, 30), (sw, 30), (hem, bottom), (-hem, bottom)], col)
    pa.ell(-sw - 1, 29, -sw + 4, 35, col)
    pa.ell(sw - 4, 29, sw + 1, 35, col)
    _upper_details(pa, p, sw, bottom, back)
    if back:
        _head(pa, p, "back", 0)
    bag_c = COLOURS.get(p.bag_colour, (0, 0, 0))
    if p.bag == "backpack":
        if back:
            pa.rect(-9.5, 33, 9.5, 62, bag_c)
            pa.rect(-6.5, 49, 6.5, 60, _shade(bag_c, 0.75))
        else:  # only the straps show from the front
            for x in (-sw + 2.2, sw - 5.2):
                pa.rect(x, 30, x + 3, 55, bag_c)
    if p.bag == "shoulder bag":
        pa.line([(side * (sw - 2), 30), (-side * (sw - 1), 58)], _shade(bag_c, 0.85), 1.6)
        pa.rect(-side * (sw + 3.5), 55, -side * (sw - 6.5), 66, bag_c)
    _arm(pa, p, sh_r, hand_r, 4.5 if not woman else 4.0)
    _arm(pa, p, sh_l, hand_l, 4.5 if not woman else 4.0)
    if p.bag == "handbag":
        hx, hy = hand_l
        pa.line([(hx - 3, hy + 3), (hx, hy - 1), (hx + 3, hy + 3)], _shade(bag_c, 0.7), 1.0)
        pa.rect(hx - 5, hy + 2, hx + 5, hy + 12, bag_c)
    if not back:
        _head(pa, p, "front", 0)
    _hat(pa, p, "back" if back else "front", 0)
    _scarf(pa, p, "back" if back else "front", 0)
    _held(pa, p, hand_r)
    if p.held_object == "umbrella":
        _umbrella(pa, hand_r)


def _draw_side(pa: _Painter, p: Person, pose: tuple[float, float, float]) -> None:
    """Profile facing +x: one arm in front of the body, legs in stride, a backpack behind."""
    swing, _, stance = pose
    woman = p.gender == "woman"
    hw = (7.0 if woman else 8.0) * BUILDS[p.build]
    lw = 6.5 if woman else 7.5
    col = COLOURS[p.upper_colour]
    stride = 3 + 6 * abs(stance)
    shoulder = (0.0, 32.0)
    near_hand = _hand_at(shoulder, 0.45 * swing)
    far_hand = _hand_at(shoulder, -0.45 * swing)
    bag_c = COLOURS.get(p.bag_colour, (0, 0, 0))
    if p.bag == "backpack":
        pa.rect(-hw - 8, 32, -hw + 1, 60, bag_c)
        pa.rect(-hw - 8, 46, -hw - 4, 58, _shade(bag_c, 0.75))
    # Far arm first, so a handbag in it peeks out behind the body.
    _arm(pa, p, shoulder, far_hand, 4.0)
    if p.bag == "handbag":
        hx, hy = far_hand
        pa.rect(hx - 5, hy + 2, hx + 5, hy + 12, bag_c)
    front_foot, back_foot = stride * (1 if swing >= 0 else -1), -stride * (1 if swing >= 0 else -1)
    _legs(pa, p, [(0.0, back_foot), (0.0, front_foot)], lw, toe=2.5)
    if p.upper_type == "dress" or p.lower_type == "skirt":
        _skirt(pa, p, 60 if p.upper_type == "dress" else 63, -2.5 + 0.3 * stride, 0.5)
    bottom = {"coat": 88.0, "dress": 62.0, "jacket": 69.0}.get(p.upper_type, 67.0)
    hem = hw + (2.0 if p.upper_type == "coat" else -1.0)
    pa.poly([(-hw, 30), (hw, 30), (hem, bottom), (-hem, bottom)], col)
    _upper_details(pa, p, hw, bottom, back=True)  # the type cues of the frontal view do not fit
    if p.upper_pattern == "logo":
        pa.rect(hw - 6, 38, hw - 1, 46, _contrast(p.upper_colour))
    if p.upper_type == "coat":
        pa.rect(hw - 2, 31, hw - 0.8, bottom, _shade(col, 0.6))
    _head(pa, p, "side", 1.0)
    _hat(pa, p, "side", 1.0)
    _scarf(pa, p, "side", 1.0)
    if p.bag == "shoulder bag":
        pa.line([(hw - 2, 30), (-hw + 1, 58)], _shade(bag_c, 0.85), 1.6)
        pa.rect(-hw - 2, 55, -hw + 7, 66, bag_c)
    if p.held_object == "umbrella":
        near_hand = (5.0, 44.0)
    _arm(pa, p, shoulder, near_hand, 4.5 if not woman else 4.0)
    _held(pa, p, near_hand)
    if p.held_object == "umbrella":
        _umbrella(pa, near_hand)


# ---------------------------------------------------------------------------------------------
# Captions

WHO = {
    "man": ("man", "male", "gentleman", "guy", "young man"),
    "woman": ("woman", "female", "lady", "girl", "young woman"),
    NONE: ("person", "pedestrian", "individual"),
}
# Words a caption may use for an attribute value; the tests read this table too.
PHRASES: dict[str, dict[str, tuple[str, ...]]] = {
    "upper_type": {
        "t-shirt": ("T-shirt", "tee", "t-shirt", "tee shirt"),
        "shirt": ("shirt", "button-up shirt", "collared shirt"),
        "jacket": ("jacket", "zip-up jacket"),
        "coat": ("coat", "long coat", "overcoat"),
        "hoodie": ("hoodie", "hooded sweatshirt"),
        "dress": ("dress",),
        NONE: ("top", "upper garment"),  # the type is not mentioned
    },
    "lower_type": {
        "trousers": ("trousers", "pants", "slacks"),
        "jeans": ("jeans", "denim jeans"),
        "shorts": ("shorts",),
        "skirt": ("skirt",),
        NONE: ("bottoms",),
    },
    "shoe_type": {
        "sneakers": ("sneakers", "trainers", "running shoes", "sports shoes"),
        "boots": ("boots", "ankle boots"),
        "leather shoes": ("leather shoes", "dress shoes", "formal shoes"),
        "sandals": ("sandals",),
        NONE: ("shoes", "footwear"),
    },
    "bag": {
        "backpack": ("backpack", "rucksack"),
        "handbag": ("handbag", "purse"),
        "shoulder bag": ("shoulder bag", "messenger bag", "crossbody bag"),
        NONE: ("bag",),
    },
    "hat": {"cap": ("cap", "baseball cap"), "beanie": ("beanie", "knit hat"), NONE: ("hat",)},
    "glasses": {
        "glasses": ("glasses", "eyeglasses", "spectacles"),
        "sunglasses": ("sunglasses", "shades", "dark glasses"),
    },
    "held_object": {
        "phone": ("holding a phone", "holding a mobile phone", "looking at a phone"),
        "umbrella": ("holding an umbrella", "carrying an umbrella"),
        "cup": ("holding a cup", "holding a coffee cup", "carrying a cup of coffee"),
        "shopping bag": ("carrying a shopping bag", "holding a paper shopping bag"),
    },
}
PLURAL_NOUNS = frozenset(
    {"trousers", "pants", "slacks", "jeans", "shorts", "bottoms", "glasses", "shades"}
    | {"sneakers", "trainers", "shoes", "boots", "sandals", "footwear", "eyeglasses"}
    | {"spectacles", "sunglasses"}
)
# Colour words as they may appear in captions, mapped to schema values.
COLOUR_WORDS: dict[str, str] = {c: c for c in COLOUR_NAMES} | {"gray": "grey", "blond": "blonde"}
COLOUR_WORDS["blonde"] = "blonde"

# Salience: annotators name the person and the big garments far more often than accessories.
_WEIGHTS = {"gender": 5.0, "upper_colour": 2.5, "upper_type": 2.0, "lower_colour": 2.0}
_WEIGHTS |= {"lower_type": 1.6, "hair_length": 1.3, "bag": 1.3, "upper_pattern": 0.8}
_WEIGHTS |= {"lower_length": 0.6, "sleeve_length": 0.8}
_BODY_ORDER = ("hair", "hat", "glasses", "upper", "scarf", "lower", "shoes", "bag", "held")


def _a(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _join(items: Sequence[str], rng: np.random.Generator) -> str:
    if len(items) == 1:
        return items[0]
    comma = "," if len(items) > 2 and rng.random() < 0.3 else ""
    return ", ".join(items[:-1]) + f"{comma} and " + items[-1]


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _mentionable(p: Person, view: str | None) -> list[str]:
    """Attributes a caption may name: visible, applicable, and not absent."""
    out = []
    for a in visible_attributes(p, view):
        v = getattr(p, a)
        if v == NONE:
            continue
        if a == "lower_length" and p.lower_type == "shorts":
            continue  # "short shorts" says nothing new
        out.append(a)
    return out


def _select(
    p: Person, rng: np.random.Generator, view: str | None, mention_range: tuple[float, float]
) -> dict[str, str]:
    cands = _mentionable(p, view)
    frac = rng.uniform(*mention_range)
    n = min(len(cands), max(2, round(frac * len(cands))))
    w = np.array([_WEIGHTS.get(a, 1.0) for a in cands])
    chosen = {cands[int(i)] for i in rng.choice(len(cands), n, replace=False, p=w / w.sum())}
    # A dress is named whenever anything about it is; a length needs its garment.
    if p.upper_type == "dress" and chosen & {"upper_colour", "sleeve_length", "upper_pattern"}:
        chosen.add("upper_type")
    if "lower_length" in chosen:
        chosen.add("upper_type" if p.upper_type == "dress" else "lower_type")
    if p.upper_type == "dress":
        chosen.discard("lower_type")
    mentions = {a: getattr(p, a) for a in ATTRIBUTE_NAMES if a in chosen}
    # Rarely, an annotator remarks on something absent.
    visible = visible_attributes(p, view)
    for a in ("bag", "hat", "glasses"):
        if getattr(p, a) == NONE and a in visible and rng.random() < 0.03:
            mentions[a] = NONE
    return mentions


def _upper_np(m: dict[str, str], rng: np.random.Generator, lower_len: str | None) -> str:
    t = m.get("upper_type", NONE)
    noun = _choice(rng, PHRASES["upper_type"][t])
    adj: list[str] = []
    if lower_len is not None:  # the length of a dress
        adj.append(_choice(rng, ("long", "floor-length") if lower_len == "long" else ("short",)))
    if "upper_colour" in m:
        adj.append(m["upper_colour"])
    suffix: list[str] = []
    pat = m.get("upper_pattern")
    if pat == "stripes":
        (adj.append("striped") if rng.random() < 0.6 else suffix.append("stripes"))
    elif pat == "checked":
        adj.append(_choice(rng, ("checked", "plaid", "checkered")))
    elif pat == "plain":
        adj.insert(0, "plain")
    elif pat == "logo":
        suffix.append(_choice(rng, ("a logo", "a logo on the front", "a print on the chest")))
    sl = m.get("sleeve_length")
    if sl is not None:
        if rng.random() < 0.5:
            adj.append(f"{sl}-sleeved")
        else:
            suffix.insert(0, f"{sl} sleeves")
    text = _a(" ".join([*adj, noun]))
    if suffix:
        text += " with " + " and ".join(suffix)
    return text


def _plural_np(adj: list[str], noun: str, rng: np.random.Generator) -> str:
    words = " ".join([*adj, noun])
    if noun.split()[-1] in PLURAL_NOUNS:
        return ("a pair of " + words) if rng.random() < 0.15 else words
    return _a(words)


def _items(p: Person, m: dict[str, str], rng: np.random.Generator) -> list[tuple[str, str, str]]:
    """(slot, kind, noun phrase or verb phrase) for every mention except gender/baldness."""
    items: list[tuple[str, str, str]] = []
    hl, hc = m.get("hair_length"), m.get("hair_colour")
    if hl == "bald":
        items.append(("hair", "have", "a bald head"))
    elif hl or hc:
        adj = [x for x in (hl, hc) if x]
        if hc == "grey" and rng.random() < 0.3:
            adj[-1] = "gray"
        items.append(("hair", "have", " ".join([*adj, "hair"])))
    if p.upper_type == "dress":
        dress_len = m.get("lower_length")
        if "upper_type" in m:
            items.append(("upper", "wear", _upper_np(m, rng, dress_len)))
    elif m.keys() & {"upper_type", "upper_colour", "sleeve_length", "upper_pattern"}:
        items.append(("upper", "wear", _upper_np(m, rng, None)))
    if m.keys() & {"lower_type", "lower_colour"}:
        t = m.get("lower_type", NONE)
        noun = _choice(rng, PHRASES["lower_type"][t])
        adj = []
        if "lower_length" in m:
            ll = m["lower_length"]
            opts = ("long", "full-length") if t in ("trousers", "jeans") else ("long",)
            adj.append(_choice(rng, opts) if ll == "long" else _choice(rng, ("short", "mini")))
        if "lower_colour" in m:
            adj.append(m["lower_colour"])
        if adj and adj[0] == "mini" and noun == "skirt":
            adj, noun = adj[1:], "miniskirt"
        items.append(("lower", "wear", _plural_np(adj, noun, rng)))
    if m.keys() & {"shoe_type", "shoe_colour"}:
        noun = _choice(rng, PHRASES["shoe_type"][m.get("shoe_type", NONE)])
        adj = [m["shoe_colour"]] if "shoe_colour" in m else []
        items.append(("shoes", "wear", _plural_np(adj, noun, rng)))
    if m.get("bag", "x") != NONE and m.keys() & {"bag", "bag_colour"}:
        noun = _choice(rng, PHRASES["bag"][m.get("bag", NONE)])
        adj = [m["bag_colour"]] if "bag_colour" in m else []
        np_ = _a(" ".join([*adj, noun]))
        if m.get("bag") == "backpack" and rng.random() < 0.3:
            np_ += " on {his} back"
        items.append(("bag", "carry", np_))
    if m.get("hat", "x") != NONE and m.keys() & {"hat", "hat_colour"}:
        noun = _choice(rng, PHRASES["hat"][m.get("hat", NONE)])
        adj = [m["hat_colour"]] if "hat_colour" in m else []
        items.append(("hat", "wear", _a(" ".join([*adj, noun]))))
    if m.get("glasses", NONE) != NONE:
        items.append(
            ("glasses", "wear", _plural_np([], _choice(rng, PHRASES["glasses"][m["glasses"]]), rng))
        )
    if m.get("scarf", NONE) != NONE:
        items.append(("scarf", "wear", _a(f"{m['scarf']} scarf")))
    if m.get("held_object", NONE) != NONE:
        items.append(("held", "hold", _choice(rng, PHRASES["held_object"][m["held_object"]])))
    return items


@dataclass(frozen=True)
class _Subject:
    noun: str  # "man", "person", "bald man"
    pron: str  # "he" | "she" | "they"
    poss: str  # "his" | "her" | "their"

    def be(self) -> str:
        return "are" if self.pron == "they" else "is"

    def have(self) -> str:
        return "have" if self.pron == "they" else "has"

    def does(self) -> str:
        return "do" if self.pron == "they" else "does"


def _negations(m: dict[str, str], s: _Subject) -> list[tuple[str, str]]:
    """(attribute, sentence) for each stated absence."""
    out = []
    if m.get("bag") == NONE:
        out.append(("bag", f"{s.pron} {s.be()} not carrying a bag"))
    if m.get("hat") == NONE:
        out.append(("hat", f"{s.pron} {s.be()} not wearing a hat"))
    if m.get("glasses") == NONE:
        out.append(("glasses", f"{s.pron} {s.does()} not wear glasses"))
    return out


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def caption_with_mentions(
    person: Person,
    rng: np.random.Generator,
    *,
    view: str | None = None,
    mention_range: tuple[float, float] | None = None,
) -> tuple[str, dict[str, str]]:
    """A caption and the exact {attribute: value} pairs it states (all true of `person`).

    Only attributes visible on `view` are mentioned (None: any). `mention_range` is the share
    of mentionable attributes to name, drawn per caption (default: the medium difficulty).
    """
    rng_range = mention_range or DIFFICULTIES[DEFAULT_DIFFICULTY].mention_range
    m = _select(person, rng, view, rng_range)
    g = m.get("gender", NONE)
    noun = _choice(rng, WHO[g])
    bald_adj = m.get("hair_length") == "bald" and rng.random() < 0.5
    if bald_adj:
        noun = f"bald {noun}"
    s = _Subject(
        noun,
        {"man": "he", "woman": "she"}.get(g, "they"),
        {"man": "his", "woman": "her"}.get(g, "their"),
    )
    items = [it for it in _items(person, m, rng) if not (bald_adj and it[2] == "a bald head")]
    if rng.random() < 0.6:
        items.sort(key=lambda it: _BODY_ORDER.index(it[0]))
    else:
        items = [items[int(i)] for i in rng.permutation(len(items))]
    items = [(slot, kind, text.replace("{his}", s.poss)) for slot, kind, text in items]
    negs = _negations(m, s)
    style = rng.random()
    if not items:  # only the subject is described, e.g. "A bald man walking."
        text = _cap(_a(s.noun)) + " walking" + _choice(rng, (".", " down the street."))
    elif style < 0.4:
        text = _one_sentence(s, items, rng)
    elif style < 0.65:
        text = _in_sentence(s, items, rng)
    else:
        text = _multi_sentence(s, items, rng)
    for a, n in negs:
        if text.count(".") >= 3:  # keep to 1-3 sentences: leave the remark unsaid
            del m[a]
        else:
            text += " " + _cap(n) + "."
    return text, m


def _by_kind(items: list[tuple[str, str, str]], *kinds: str) -> list[str]:
    return [t for _, k, t in items if k in kinds]


def _one_sentence(s: _Subject, items: list[tuple[str, str, str]], rng: np.random.Generator) -> str:
    """Like: A man with short hair, wearing a red jacket, carrying a backpack."""
    parts = []
    have, wear = _by_kind(items, "have"), _by_kind(items, "wear")
    carry, hold = _by_kind(items, "carry"), _by_kind(items, "hold")
    if have:
        parts.append("with " + _join(have, rng))
    if wear:
        parts.append(_choice(rng, ("wearing ", "wearing ", "dressed in ")) + _join(wear, rng))
    if carry:
        parts.append(_choice(rng, ("carrying ", "with ")) + _join(carry, rng))
    parts.extend(hold)
    order = (
        [int(i) for i in rng.permutation(len(parts))] if rng.random() < 0.3 else range(len(parts))
    )
    parts = [parts[i] for i in order]
    if parts[0].startswith("wearing ") and rng.random() < 0.4:
        parts[0] = "who is " + parts[0]
    return _cap(_a(s.noun)) + " " + ", ".join(parts) + "."


def _in_sentence(s: _Subject, items: list[tuple[str, str, str]], rng: np.random.Generator) -> str:
    """Like: A woman in a blue coat and black boots, with long hair and a red handbag."""
    wear = _by_kind(items, "wear")
    withs = _by_kind(items, "have", "carry")
    hold = _by_kind(items, "hold")
    head = _cap(_a(s.noun))
    parts = []
    if wear:
        parts.append("in " + _join(wear, rng))
    if withs:
        parts.append("with " + _join(withs, rng))
    parts.extend(hold)
    return head + " " + ", ".join(parts) + "."


def _multi_sentence(
    s: _Subject, items: list[tuple[str, str, str]], rng: np.random.Generator
) -> str:
    """Like: The man is wearing a grey hoodie and jeans. He has short brown hair."""
    wear = _by_kind(items, "wear")
    have, carry, hold = _by_kind(items, "have"), _by_kind(items, "carry"), _by_kind(items, "hold")
    # Verbs are placeholders: the first sentence's subject is a singular noun, later ones a
    # pronoun that may be "they".
    sentences: list[str] = []
    if wear:
        if len(wear) > 2 and rng.random() < 0.5:
            cut = int(rng.integers(1, len(wear)))
            sentences.append(f"{{S}} {{BE}} wearing {_join(wear[:cut], rng)}")
            sentences.append(f"{{S}} also {{WEARS}} {_join(wear[cut:], rng)}")
        else:
            sentences.append(f"{{S}} {{BE}} wearing {_join(wear, rng)}")
    if have:
        sentences.append(f"{{S}} {{HAS}} {_join(have, rng)}")
    if carry:
        sentences.append(f"{{S}} {{BE}} carrying {_join(carry, rng)}")
    if hold:
        sentences.append(f"{{S}} {{BE}} {_join(hold, rng)}")
    if len(sentences) > 3:  # annotators write 1-3 sentences: merge the tail
        tail = [x.replace("{S} ", "", 1) for x in sentences[2:]]
        sentences = [*sentences[:2], "{S} " + _join(tail, rng)]
    if rng.random() < 0.5 and len(sentences) > 1:
        first, rest = sentences[0], sentences[1:]
        sentences = [first] + [rest[int(i)] for i in rng.permutation(len(rest))]
    out = []
    for i, sen in enumerate(sentences):
        if i == 0:
            subj = f"{'this' if rng.random() < 0.3 else 'the'} {s.noun}"
            verbs = {"{BE}": "is", "{HAS}": "has", "{WEARS}": "wears"}
        else:
            subj = s.pron
            they = s.pron == "they"
            verbs = {"{BE}": s.be(), "{HAS}": s.have(), "{WEARS}": "wear" if they else "wears"}
        sen = sen.replace("{S}", subj)
        for k, v in verbs.items():
            sen = sen.replace(k, v)
        out.append(_cap(sen) + ".")
    return " ".join(out)


def caption(person: Person, rng: np.random.Generator, *, view: str | None = None) -> str:
    """An annotator-style caption that mentions a random subset of the attributes."""
    return caption_with_mentions(person, rng, view=view)[0]


def person_record(person: Person) -> dict[str, str | int]:
    """Plain-data form of a person (all fields), for JSON."""
    return asdict(person)
