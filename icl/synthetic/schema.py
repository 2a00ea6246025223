"""The synthetic pedestrian world's attribute schema: identities (`Person`) and their sampling.

Every identity is a `Person` drawn from an explicit attribute schema (`ATTRIBUTES`), so that
later models (attribute VQA, caption parsers) can ask about exactly the same attributes the
generator used. `icl.synthetic.render` draws a person, `icl.synthetic.captions` describes one;
this module needs neither (the demo MLLM imports only the schema). Everything is a pure
function of the numpy Generator passed in, so datasets are reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np

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
        changes: dict[str, Any] = {a: va, b: vb}
        cand = replace(source, person_id=person_id, **changes)
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


def person_record(person: Person) -> dict[str, str | int]:
    """Plain-data form of a person (all fields), for JSON."""
    return asdict(person)
