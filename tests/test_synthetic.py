"""The synthetic pedestrian world and its CUHK-PEDES writer."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from icl.synthetic.captions import COLOUR_WORDS, PHRASES, WHO, caption_with_mentions
from icl.synthetic.dataset import (
    ANNOTATION_FILE,
    ATTRIBUTES_FILE,
    tokens,
    write_synthetic_dataset,
)
from icl.synthetic.render import render
from icl.synthetic.schema import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    COLOUR_ATTRIBUTES,
    DIFFICULTIES,
    NONE,
    VIEWS,
    attribute_diff,
    check_person,
    sample_person,
    sample_population,
    visible_attributes,
)

pytestmark = pytest.mark.unit  # pure and fast: no server


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    write_synthetic_dataset(out, ids=20, seed=5, images_per_id=2)
    return out


def test_same_seed_gives_identical_bytes(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_synthetic_dataset(again, ids=20, seed=5, images_per_id=2)
    a, b = _files(small), _files(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a)


def test_different_seed_differs(small: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    write_synthetic_dataset(other, ids=20, seed=6, images_per_id=2)
    assert (other / ANNOTATION_FILE).read_bytes() != (small / ANNOTATION_FILE).read_bytes()
    a, b = _files(small), _files(other)
    shared = [k for k in a if k.endswith(".png") and k in b]
    assert sum(a[k] != b[k] for k in shared) == len(shared)


def test_splits_and_schema(small: Path) -> None:
    records = json.loads((small / ANNOTATION_FILE).read_text())
    assert len(records) == 40
    ids_by_split: dict[str, set[int]] = {"train": set(), "val": set(), "test": set()}
    for r in records:
        assert set(r) == {"split", "captions", "file_path", "id", "processed_tokens"}
        assert r["split"] in ids_by_split
        assert isinstance(r["id"], int) and 1 <= r["id"] <= 20
        assert r["file_path"] == f"{r['split']}/{r['id']:05d}_{r['file_path'][-5]}.png"
        assert (small / "imgs" / r["file_path"]).is_file()
        assert len(r["captions"]) == 2 and all(isinstance(c, str) and c for c in r["captions"])
        assert r["processed_tokens"] == [tokens(c) for c in r["captions"]]
        for toks in r["processed_tokens"]:
            assert all(t == t.lower() and re.fullmatch(r"[a-z0-9-]+", t) for t in toks)
        ids_by_split[r["split"]].add(r["id"])
    assert {k: len(v) for k, v in ids_by_split.items()} == {"train": 15, "val": 2, "test": 3}
    tr, va, te = ids_by_split.values()
    assert not (tr & va or tr & te or va & te)
    labels = json.loads((small / ATTRIBUTES_FILE).read_text())
    assert set(labels) == {r["file_path"] for r in records}
    for lab in labels.values():
        assert set(ATTRIBUTE_NAMES) | {"view", "sibling_of", "mentions"} == set(lab)
        # Each caption's stated attributes are true of the person it describes.
        assert len(lab["mentions"]) == 2
        for mentions in lab["mentions"]:
            assert mentions and all(lab[a] == v for a, v in mentions.items())
        assert lab["view"] in VIEWS


def test_summary_counts(tmp_path: Path) -> None:
    s = write_synthetic_dataset(
        tmp_path / "d", ids=40, seed=1, difficulty="hard", images_per_id=1, captions_per_image=3
    )
    assert s.ids == {"train": 30, "val": 4, "test": 6}
    assert s.images == s.ids
    assert s.captions == {k: 3 * v for k, v in s.ids.items()}
    assert s.json_path == tmp_path / "d" / ANNOTATION_FILE and s.json_path.is_file()
    labels = json.loads(s.attributes_path.read_text())
    assert sum(lab["sibling_of"] is not None for lab in labels.values()) == 20  # 50% of 40


def test_refuses_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 10"):
        write_synthetic_dataset(tmp_path / "a", ids=9, seed=0)
    with pytest.raises(ValueError, match="unknown difficulty"):
        write_synthetic_dataset(tmp_path / "b", ids=10, seed=0, difficulty="brutal")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a synthetic dataset"):
        write_synthetic_dataset(foreign, ids=10, seed=0)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_rewrites_a_previous_dataset(tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_synthetic_dataset(out, ids=12, seed=0, images_per_id=2)
    write_synthetic_dataset(out, ids=10, seed=0, images_per_id=1)
    records = json.loads((out / ANNOTATION_FILE).read_text())
    pngs = {str(p.relative_to(out / "imgs")) for p in (out / "imgs").rglob("*.png")}
    assert pngs == {r["file_path"] for r in records}  # no stale images from the first run


def test_images_have_the_size_and_differ(tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "d", ids=10, seed=2, images_per_id=1, image_size=(96, 32))
    imgs = [
        np.asarray(Image.open(io.BytesIO(p.read_bytes())))
        for p in sorted((tmp_path / "d" / "imgs").rglob("*.png"))
    ]
    assert len(imgs) == 10
    assert all(im.shape == (96, 32, 3) and im.dtype == np.uint8 for im in imgs)
    stack = np.stack(imgs).astype(np.float32)
    assert float(stack.std(axis=0).mean()) > 20.0  # identities are not alike
    assert all(float(im.std()) > 10.0 for im in stack)  # and no image is blank


def test_render_is_deterministic_and_sized() -> None:
    p = sample_person(np.random.default_rng(0), 1)
    for view in VIEWS:
        a = render(p, np.random.default_rng(3), (128, 48), view=view)
        b = render(p, np.random.default_rng(3), (128, 48), view=view)
        assert a.shape == (128, 48, 3) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="unknown view"):
        render(p, np.random.default_rng(3), view="top")


def test_people_are_valid_and_cover_the_schema() -> None:
    rng = np.random.default_rng(0)
    people = [sample_person(rng, i) for i in range(3000)]
    assert all(not check_person(p) for p in people)
    for name, values in ATTRIBUTES.items():
        seen = {getattr(p, name) for p in people}
        assert seen == set(values), name
    assert not any(p.gender == "man" and "dress" in (p.upper_type,) for p in people)
    assert not any(p.gender == "man" and p.lower_type == "skirt" for p in people)
    assert sample_person(np.random.default_rng(9), 4) == sample_person(np.random.default_rng(9), 4)


def test_siblings_differ_in_exactly_two_attributes() -> None:
    for frac in (d.sibling_fraction for d in DIFFICULTIES.values()):
        people, sibling_of = sample_population(np.random.default_rng(4), 200, frac)
        assert len(sibling_of) == round(frac * 200)
        by_id = {p.person_id: p for p in people}
        assert sorted(by_id) == list(range(1, 201))
        for sib, src in sibling_of.items():
            assert src not in sibling_of  # a sibling copies an original identity
            assert len(attribute_diff(by_id[sib], by_id[src])) == 2
            assert not check_person(by_id[sib])
            assert (by_id[sib].skin, by_id[sib].build) == (by_id[src].skin, by_id[src].build)


_MAN_WORDS = {w.split()[-1] for w in WHO["man"]} | {"he", "his"}
_WOMAN_WORDS = {w.split()[-1] for w in WHO["woman"]} | {"she", "her"}


def _check_caption(text: str, mentions: dict[str, str], person, view: str) -> None:
    attrs = person.attributes()
    # Every stated pair is true, visible on that view, and "none" only for rare remarks.
    for a, v in mentions.items():
        assert attrs[a] == v, (text, a, v)
        assert a in visible_attributes(person, view), (text, a)
        if v == NONE:
            assert a in ("bag", "hat", "glasses") and " not " in text
    toks = tokens(text)
    # Colour words: exactly the colours of mentioned colour attributes, no other.
    said = {COLOUR_WORDS[t] for t in toks if t in COLOUR_WORDS}
    stated = {v for a, v in mentions.items() if a in COLOUR_ATTRIBUTES}
    assert said == stated, (text, mentions)
    # Gender words and pronouns only when the gender is stated, and then the right ones.
    g = mentions.get("gender")
    if set(toks) & _MAN_WORDS:
        assert g == "man", text
    if set(toks) & _WOMAN_WORDS:
        assert g == "woman", text
    if g is not None:
        assert set(toks) & (_MAN_WORDS if g == "man" else _WOMAN_WORDS), text
    # Garment and object types: one of their phrases is in the text.
    low = text.lower()
    for a in ("upper_type", "lower_type", "shoe_type", "bag", "hat", "glasses", "held_object"):
        v = mentions.get(a)
        if v is not None and v != NONE:
            assert any(ph.lower() in low for ph in PHRASES[a][v]), (text, a, v)
    if mentions.get("hair_length") == "bald":
        assert "bald" in toks
    # Surface form: sentences, no leftovers from templates, articles agree.
    assert text[0].isupper() and text.endswith(".") and "  " not in text, text
    assert "{" not in text and ",," not in text and " ." not in text, text
    assert 1 <= text.count(".") <= 3, text
    assert not re.search(r"\ba [aeiou]", low) and not re.search(r"\ban [^aeiou ]", low), text


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_captions_never_contradict_the_person(difficulty: str) -> None:
    rng = np.random.default_rng(11)
    lo, hi = DIFFICULTIES[difficulty].mention_range
    counts = []
    for i in range(400):
        person = sample_person(rng, i)
        view = VIEWS[i % 3]
        text, mentions = caption_with_mentions(person, rng, view=view, mention_range=(lo, hi))
        _check_caption(text, mentions, person, view)
        counts.append(len([v for v in mentions.values() if v != NONE]))
    # Captions say a varied, partial amount: never everything, never the same each time.
    assert max(counts) < len(ATTRIBUTE_NAMES) and len(set(counts)) >= 4


def test_captions_vary_and_are_deterministic() -> None:
    person = sample_person(np.random.default_rng(1), 1)
    texts = {caption_with_mentions(person, np.random.default_rng(s))[0] for s in range(30)}
    assert len(texts) >= 25
    a = caption_with_mentions(person, np.random.default_rng(3), view="side")
    assert a == caption_with_mentions(person, np.random.default_rng(3), view="side")


def test_back_view_hides_the_face_and_the_print() -> None:
    rng = np.random.default_rng(2)
    people = [sample_person(rng, i) for i in range(500)]
    for p in people:
        if p.glasses != NONE or p.upper_pattern == "logo":
            for s in range(5):
                _, m = caption_with_mentions(
                    p, np.random.default_rng(s), view="back", mention_range=(1.0, 1.0)
                )
                assert "glasses" not in m
                assert m.get("upper_pattern") != "logo"


def test_schema_stands_alone_for_the_demo_mllm() -> None:
    """The serving path (demo MLLM) needs the attribute list only: no drawing, no captions."""
    code = (
        "import sys, icl.mllm.demo\n"
        "print(sorted(m for m in sys.modules if m.startswith('icl.synthetic')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['icl.synthetic', 'icl.synthetic.schema']"
