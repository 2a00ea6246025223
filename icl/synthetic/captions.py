"""Captions of the synthetic pedestrian world: what an annotator looking at a view might write.

`caption` mentions a random subset of a `Person`'s visible attributes in varied words;
`caption_with_mentions` also returns the exact attribute values stated. Pure functions of
the numpy Generator passed in, so captions are reproducible per seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icl.synthetic.schema import (
    ATTRIBUTE_NAMES,
    COLOUR_NAMES,
    DEFAULT_DIFFICULTY,
    DIFFICULTIES,
    NONE,
    Person,
    visible_attributes,
)

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
