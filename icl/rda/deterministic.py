"""RDA's deterministic path, for an MLLM that cannot generate free text (the demo MLLM).

- Enrich: the MLLM still answers the 15 VQA questions; the answers are merged with the
  caption by `icl.mllm.contract.merge_answers` (the same merge THI uses for such a backend).
- Decompose: the caption stays one group (splitting free text by rule would cut attributes
  apart from their nouns); every kept answer sentence is one group: the demo MLLM already
  answers one attribute per sentence ("The shoes are black.").
- Rewrite: m paraphrases per sentence from a template bank keyed by the sentence's shape
  (varied subject, verb and word order), then word-level synonyms. The choice depends only
  on the sentence and m, never on the order of processing, so a resumed run writes the same
  bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from functools import partial

from icl.mllm.contract import merge_answers

_SENTENCE = re.compile(r"(?<=[.!?])\s+")

# (pattern over the whole sentence, templates filled with the named groups). The first
# template of each entry is not the sentence itself: the original is always paraphrase 0.
_BANK: tuple[tuple[re.Pattern[str], tuple[str, ...]], ...] = tuple(
    (re.compile(p, re.I), t)
    for p, t in (
        (
            r"^The person is an? (?P<x>man|woman)\.$",
            (
                "This pedestrian is a {x}.",
                "The image shows a {x}.",
                "A {x} is walking here.",
                "The subject is a {x}.",
                "It is a {x}.",
                "We see a {x}.",
            ),
        ),
        (
            r"^The person is bald\.$",
            (
                "The pedestrian has no hair.",
                "This person has a bald head.",
                "The subject is bald.",
                "Their head is bald.",
                "A bald person.",
            ),
        ),
        (
            r"^The person has (?P<x>[\w -]+) hair\.$",
            (
                "The person's hair is {x}.",
                "This pedestrian has {x} hair.",
                "Their hair is {x}.",
                "The subject's hair looks {x}.",
                "{X} hair.",
                "The hair of the person is {x}.",
            ),
        ),
        (
            r"^The clothes are (?P<x>[\w -]+)\.$",
            (
                "The clothing is {x}.",
                "The person's clothes are {x}.",
                "The garments look {x}.",
                "The outfit is {x}.",
                "Their clothes are {x}.",
            ),
        ),
        (
            r"^The (?P<x>[\w -]+?) is (?P<c>[\w-]+)\.$",
            (
                "The {x} is {c} in colour.",
                "The colour of the {x} is {c}.",
                "The person's {x} is {c}.",
                "A {c} {x}.",
                "The {x} looks {c}.",
                "Their {x} is {c}.",
            ),
        ),
        (
            r"^The (?P<x>[\w -]+?) are (?P<c>[\w-]+)\.$",
            (
                "The {x} are {c} in colour.",
                "The person's {x} are {c}.",
                "The colour of the {x} is {c}.",
                "{C} {x}.",
                "The {x} look {c}.",
                "Their {x} are {c}.",
            ),
        ),
        (
            r"^The upper garment has (?P<x>\w+) sleeves\.$",
            (
                "The top is {x}-sleeved.",
                "The person's upper garment has {x} sleeves.",
                "The sleeves are {x}.",
                "A {x}-sleeved top.",
                "The upper clothing has {x} sleeves.",
            ),
        ),
        (
            r"^The person is not (?P<v>wearing|carrying|holding) (?P<x>.+)\.$",
            (
                "The person has no {x_bare}.",
                "There is no {x_bare}.",
                "The pedestrian is not {v} {x}.",
                "No {x_bare} can be seen.",
                "They are without {x}.",
                "The subject does not have {x}.",
            ),
        ),
        (
            r"^The person is (?P<v>wearing|carrying|holding) (?P<x>.+)\.$",
            (
                "The pedestrian is {v} {x}.",
                "The person {v3} {x}.",
                "{X_cap} can be seen on the person.",
                "They are {v} {x}.",
                "The subject {v3} {x}.",
                "The person has {x}.",
            ),
        ),
        (
            r"^The top has a logo\.$",
            (
                "There is a logo on the top.",
                "The upper garment carries a logo.",
                "The person's top shows a logo.",
                "A logo is printed on the top.",
                "The top bears a logo.",
            ),
        ),
    )
)
_THIRD_PERSON = {"wearing": "wears", "carrying": "carries", "holding": "holds"}

# Word-level synonyms for sentences outside the bank (captions): each paraphrase applies a
# different subset, chosen by a hash of the sentence. Only true synonyms: a word that names
# another attribute value (jacket/coat, top/shirt, carrying/holding) would change the label.
_SYNONYMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("person", ("pedestrian", "individual", "subject")),
    ("wearing", ("dressed in", "in", "wearing")),
    ("wears", ("has on", "is dressed in", "is wearing")),
    ("carrying", ("with", "bearing", "toting")),
    ("a man", ("a male", "a gentleman", "a guy")),
    ("a woman", ("a female", "a lady", "a woman")),
    ("trousers", ("pants", "slacks", "trousers")),
    ("sneakers", ("trainers", "sports shoes", "sneakers")),
    ("t-shirt", ("tee", "T-shirt", "tee shirt")),
    ("and", ("and", "as well as", "plus")),
    ("with", ("with", "having", "with")),
    ("dressed in", ("wearing", "clad in", "in")),
    ("an individual", ("a person", "someone", "a pedestrian")),
    ("pants", ("trousers", "slacks", "pants")),
    ("shoes", ("footwear", "shoes", "shoes")),
    ("top", ("upper garment", "upper-body garment", "top")),
    ("bottoms", ("lower garment", "lower-body garment", "bottoms")),
)


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _fill(template: str, groups: dict[str, str]) -> str:
    x = groups.get("x", "")
    bare = re.sub(r"^(a|an|any)\s+", "", x)
    fields = {
        **groups,
        "X": x[:1].upper() + x[1:],
        "C": groups.get("c", "")[:1].upper() + groups.get("c", "")[1:],
        "x_bare": bare or x,
        "X_cap": x[:1].upper() + x[1:],
        "v3": _THIRD_PERSON.get(groups.get("v", ""), groups.get("v", "")),
    }
    return template.format(**fields)


def _same_case(found: str, pick: str) -> str:
    return pick[:1].upper() + pick[1:] if found[:1].isupper() else pick


def _replace_with(pick: str, match: re.Match[str]) -> str:
    return _same_case(match.group(0), pick)


def _synonym_variants(sentence: str, count: int) -> list[str]:
    out: list[str] = []
    seed = _digest(sentence)
    for k in range(count * 8):
        text = sentence
        for j, (word, choices) in enumerate(_SYNONYMS):
            pattern = re.compile(rf"\b{re.escape(word)}\b", re.I)
            if not pattern.search(text) or (seed >> ((j + k) % 48)) & 1 == (k & 1):
                continue
            pick = choices[(seed // (k + 1) + j) % len(choices)]
            text = pattern.sub(partial(_replace_with, pick), text, count=1)
        if text not in out and text != sentence:
            out.append(text)
        if len(out) >= count:
            break
    return out


def paraphrases(sentence: str, m: int) -> list[str]:
    """`m` distinct wordings of `sentence` (the sentence itself first); fewer only when the
    bank and the synonyms cannot make m different ones."""
    sentence = sentence.strip()
    out = [sentence]
    for pattern, templates in _BANK:
        match = pattern.match(sentence)
        if match is None:
            continue
        groups = {k: v for k, v in match.groupdict().items() if v is not None}
        start = _digest(sentence) % len(templates)
        for i in range(len(templates)):
            text = _fill(templates[(start + i) % len(templates)], groups)
            if text not in out:
                out.append(text)
        break
    if len(out) < m:
        out += [t for t in _synonym_variants(sentence, m) if t not in out]
    return out[:m]


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text.strip()) if s.strip()]


def enrich(caption: str, answers: Sequence[str]) -> str:
    return merge_answers(caption, answers)


def decompose(caption: str, enriched: str) -> list[str]:
    """The caption as one group, then each further sentence of the enriched text."""
    head = caption.strip().rstrip(".") + "."
    rest = enriched[len(head) :] if enriched.startswith(head) else enriched
    groups = [head]
    for sentence in split_sentences(rest):
        if sentence not in groups:
            groups.append(sentence)
    return groups


__all__ = ["decompose", "enrich", "paraphrases", "split_sentences"]
