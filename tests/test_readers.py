"""Benchmark readers on tiny datasets of each format, generated here in tmp_path."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from icl.data import (
    FORMATS,
    DatasetError,
    ImageRecord,
    ReidDataset,
    carve_val_split,
    detect_format,
    read_dataset,
)

# Per format: (splits written, captions per record, subfolder pattern of the image paths).
pytestmark = pytest.mark.unit  # pure and fast: no server

LAYOUT = {
    "cuhk-pedes": (("train", "val", "test"), 2, "CUHK0{pid}"),
    "icfg-pedes": (("train", "test"), 1, "{split}/{pid:04d}"),
    "rstpreid": (("train", "val", "test"), 2, ""),
    "ufine6926": (("train", "test"), 2, "{split}"),
}


def _record(fmt: str, split: str, pid: int, rel: str, captions: list[str]) -> dict[str, Any]:
    rec: dict[str, Any] = {"split": split, "id": pid, "captions": captions}
    rec[FORMATS[fmt].image_key] = rel
    if fmt == "cuhk-pedes":
        rec["processed_tokens"] = [c.lower().split() for c in captions]
    return rec


def make_dataset(
    root: Path,
    fmt: str,
    *,
    ids_per_split: int = 3,
    images_per_id: int = 2,
    png: bool = False,
    image_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Write a small dataset of `fmt` under `root`; return the records written."""
    splits, n_caps, folder = LAYOUT[fmt]
    images = image_dir if image_dir is not None else root / "imgs"
    records = []
    pid = 1  # CUHK ids are 1-based; the others may start anywhere
    for split in splits:
        for _ in range(ids_per_split):
            for k in range(images_per_id):
                sub = folder.format(pid=pid, split=split)
                rel = f"{sub}/{pid}_{k}.png" if sub else f"{pid}_{k}.png"
                caps = [f"  person {pid} view {k} caption {c}. \n" for c in range(n_caps)]
                records.append(_record(fmt, split, pid, rel, caps))
                path = images / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if png:
                    Image.new("RGB", (4, 8), (pid % 256, k, 0)).save(path)
                else:
                    path.write_bytes(b"x")
            pid += 1
    write_annotations(root, fmt, records)
    return records


def write_annotations(root: Path, fmt: str, data: Any) -> Path:
    ann = root / FORMATS[fmt].annotation_file
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps(data))
    return ann


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_read_each_format(tmp_path: Path, fmt: str):
    written = make_dataset(tmp_path, fmt, png=True)
    assert detect_format(tmp_path) == fmt
    ds = read_dataset(tmp_path)
    assert isinstance(ds, ReidDataset)
    assert ds.format == fmt
    assert ds.root == tmp_path.resolve()
    assert len(ds.records) == len(written)
    splits, n_caps, _ = LAYOUT[fmt]
    assert list(ds.splits()) == list(splits)
    assert all(n == 6 for n in ds.splits().values())
    for rec, raw in zip(ds.records, written, strict=True):
        assert isinstance(rec, ImageRecord)
        assert rec.image_path.is_absolute() and rec.image_path.is_file()
        assert rec.image_path == tmp_path.resolve() / "imgs" / raw[FORMATS[fmt].image_key]
        assert rec.person_id == raw["id"]
        assert rec.split == raw["split"]
        assert len(rec.captions) == n_caps
        assert rec.captions == tuple(c.strip() for c in raw["captions"])
        assert all(c and c == c.strip() for c in rec.captions)
    test = ds.split("test")
    assert {r.person_id for r in test} == {r["id"] for r in written if r["split"] == "test"}
    summary = ds.summary()
    assert "\n" not in summary
    assert summary.startswith(fmt)
    assert f"test 6 images / {6 * n_caps} captions / 3 ids" in summary
    # An explicit format gives the same result as detection.
    assert read_dataset(tmp_path, fmt) == ds


def test_split_absent_names_present_splits(tmp_path: Path):
    make_dataset(tmp_path, "icfg-pedes")
    ds = read_dataset(tmp_path)
    with pytest.raises(DatasetError, match=r"no 'val' split \(present: train, test\)"):
        ds.split("val")


def test_detect_format_none_lists_what_was_looked_for(tmp_path: Path):
    with pytest.raises(DatasetError) as e:
        detect_format(tmp_path)
    assert str(tmp_path) in str(e.value)
    for spec in FORMATS.values():
        assert spec.annotation_file in str(e.value)


def test_detect_format_ambiguous(tmp_path: Path):
    make_dataset(tmp_path, "cuhk-pedes")
    make_dataset(tmp_path, "rstpreid")
    with pytest.raises(DatasetError, match="several annotation files"):
        detect_format(tmp_path)
    assert read_dataset(tmp_path, "rstpreid").format == "rstpreid"


def test_unknown_format(tmp_path: Path):
    with pytest.raises(DatasetError, match="unknown format 'market'"):
        read_dataset(tmp_path, "market")


def test_image_root_override(tmp_path: Path):
    root, elsewhere = tmp_path / "anno", tmp_path / "pictures"
    written = make_dataset(root, "rstpreid", image_dir=elsewhere)
    with pytest.raises(DatasetError, match="image file not found"):
        read_dataset(root)  # <root>/imgs does not exist
    ds = read_dataset(root, image_root=elsewhere)
    assert [r.image_path for r in ds.records] == [
        elsewhere.resolve() / r["img_path"] for r in written
    ]
    # Without the image check the default folder is used even though it is absent.
    ds2 = read_dataset(root, check_images=False)
    assert ds2.records[0].image_path == root.resolve() / "imgs" / written[0]["img_path"]


# --- errors: each names the file and, for record errors, the record index -------------------


def _bad(tmp_path: Path, fmt: str, index: int, **changes: Any) -> Path:
    """A valid dataset whose record `index` has keys replaced (None value = key removed)."""
    records = make_dataset(tmp_path, fmt)
    for key, value in changes.items():
        if value is None:
            del records[index][key]
        else:
            records[index][key] = value
    return write_annotations(tmp_path, fmt, records)


def _expect(tmp_path: Path, ann: Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path, **kwargs)
    msg = str(e.value)
    assert str(ann) in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_missing_annotation_file(tmp_path: Path):
    ann = tmp_path / "reid_raw.json"
    with pytest.raises(DatasetError, match="annotation file not found") as e:
        read_dataset(tmp_path, "cuhk-pedes")
    assert str(ann) in str(e.value)


def test_invalid_json(tmp_path: Path):
    ann = tmp_path / "data_captions.json"
    ann.write_text('[{"split": "train",')
    _expect(tmp_path, ann, "invalid JSON", "line 1")


def test_top_level_not_a_list(tmp_path: Path):
    ann = write_annotations(tmp_path, "rstpreid", {"annotations": []})
    _expect(tmp_path, ann, "top-level value is a dict")


def test_empty_list(tmp_path: Path):
    ann = write_annotations(tmp_path, "rstpreid", [])
    _expect(tmp_path, ann, "empty")


def test_record_not_an_object(tmp_path: Path):
    records: list[Any] = make_dataset(tmp_path, "cuhk-pedes")
    records[4] = ["train", 3]
    ann = write_annotations(tmp_path, "cuhk-pedes", records)
    _expect(tmp_path, ann, "record 4", "is a list, expected an object")


@pytest.mark.parametrize("key", ["split", "id", "captions", "file_path"])
def test_missing_key(tmp_path: Path, key: str):
    ann = _bad(tmp_path, "icfg-pedes", 5, **{key: None})
    _expect(tmp_path, ann, "record 5", f"missing key '{key}'")


def test_missing_image_key_uses_format_key(tmp_path: Path):
    ann = _bad(tmp_path, "rstpreid", 2, img_path=None)
    _expect(tmp_path, ann, "record 2", "missing key 'img_path'")


@pytest.mark.parametrize(
    ("key", "value", "typename"),
    [
        ("id", "7", "str"),
        ("id", 7.0, "float"),
        ("id", True, "bool"),
        ("split", 1, "int"),
        ("captions", "a man in red", "str"),
        ("file_path", ["a.png"], "list"),
    ],
)
def test_ill_typed_key(tmp_path: Path, key: str, value: Any, typename: str):
    ann = _bad(tmp_path, "ufine6926", 3, **{key: value})
    _expect(tmp_path, ann, "record 3", f"key '{key}' is a {typename}")


def test_caption_not_a_string(tmp_path: Path):
    ann = _bad(tmp_path, "rstpreid", 1, captions=["fine", 3])
    _expect(tmp_path, ann, "record 1", "key 'captions'[1] is a int")


def test_empty_caption_list(tmp_path: Path):
    ann = _bad(tmp_path, "cuhk-pedes", 7, captions=[])
    _expect(tmp_path, ann, "record 7", "key 'captions' is an empty list")


def test_empty_caption(tmp_path: Path):
    ann = _bad(tmp_path, "cuhk-pedes", 6, captions=["a woman", "   \n"])
    _expect(tmp_path, ann, "record 6", "key 'captions'[1] is empty")


def test_unknown_split_for_format(tmp_path: Path):
    # ICFG-PEDES has no val split; a val record is a broken file, not a bonus split.
    ann = _bad(tmp_path, "icfg-pedes", 2, split="val")
    _expect(tmp_path, ann, "record 2", "key 'split' is 'val'", "train, test")


def test_negative_id(tmp_path: Path):
    ann = _bad(tmp_path, "rstpreid", 9, id=-1)
    _expect(tmp_path, ann, "record 9", "key 'id' is negative")


@pytest.mark.parametrize(
    ("path", "what"),
    [
        ("../outside.png", "escapes"),
        ("CUHK01/../../outside.png", "escapes"),
        ("/etc/passwd", "absolute"),
        ("C:\\imgs\\a.png", "absolute"),
        ("..\\outside.png", "escapes"),
        ("", "empty path"),
    ],
)
def test_path_escaping_image_root(tmp_path: Path, path: str, what: str):
    ann = _bad(tmp_path, "cuhk-pedes", 8, file_path=path)
    # Rejected even without the image check: the path is never joined onto the root.
    _expect(tmp_path, ann, "record 8", "key 'file_path'", what, check_images=False)


def test_missing_image(tmp_path: Path):
    records = make_dataset(tmp_path, "icfg-pedes")
    missing = tmp_path / "imgs" / records[10]["file_path"]
    missing.unlink()
    ann = tmp_path / "ICFG-PEDES.json"
    _expect(tmp_path, ann, "record 10", "image file not found", str(missing.resolve()))
    assert len(read_dataset(tmp_path, check_images=False).records) == len(records)


def test_missing_images_reports_first_and_count(tmp_path: Path):
    records = make_dataset(tmp_path, "rstpreid")
    for i in (4, 2, 11):
        (tmp_path / "imgs" / records[i]["img_path"]).unlink()
    ann = tmp_path / "data_captions.json"
    _expect(tmp_path, ann, "record 2", "2 more images missing")


def test_directory_is_not_an_image(tmp_path: Path):
    records = make_dataset(tmp_path, "rstpreid")
    img = tmp_path / "imgs" / records[0]["img_path"]
    img.unlink()
    img.mkdir()
    _expect(tmp_path, tmp_path / "data_captions.json", "record 0", "image file not found")


def test_large_file_reads_fast(tmp_path: Path):
    # 100k records: several records share an image so the test writes only 2,000 files, but
    # the reader still checks every record's image.
    records = []
    for i in range(100_000):
        rel = f"d{i % 100}/{i % 2000}.jpg"
        records.append({"split": "train", "id": i // 4, "captions": ["a man"], "file_path": rel})
    for i in range(2000):
        path = tmp_path / "imgs" / f"d{i % 100}" / f"{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    write_annotations(tmp_path, "icfg-pedes", records)
    start = time.perf_counter()
    ds = read_dataset(tmp_path)
    assert time.perf_counter() - start < 10  # about 1.5 s on a 2-core machine
    assert ds.splits() == {"train": 100_000}


# --- carve_val_split ------------------------------------------------------------------------


def test_carve_val_split(tmp_path: Path):
    make_dataset(tmp_path, "icfg-pedes", ids_per_split=20, images_per_id=3)
    ds = read_dataset(tmp_path)
    carved = carve_val_split(ds, fraction=0.25, seed=1)
    assert carved.splits() == {"train": 45, "val": 15, "test": 60}
    assert carve_val_split(ds, fraction=0.25, seed=1) == carved  # deterministic
    assert carve_val_split(ds, fraction=0.25, seed=2) != carved  # and seed-dependent
    train_ids = {r.person_id for r in carved.split("train")}
    val_ids = {r.person_id for r in carved.split("val")}
    assert len(val_ids) == 5 and not train_ids & val_ids  # whole identities move
    assert train_ids | val_ids == {r.person_id for r in ds.split("train")}
    assert carved.split("test") == ds.split("test")  # test untouched
    # Record order and everything but the split are kept.
    for before, after in zip(ds.records, carved.records, strict=True):
        assert (before.image_path, before.person_id, before.captions) == (
            after.image_path,
            after.person_id,
            after.captions,
        )
    assert ds.splits() == {"train": 60, "test": 60}  # the input is not modified


def test_carve_val_split_errors(tmp_path: Path):
    make_dataset(tmp_path, "cuhk-pedes")
    with pytest.raises(DatasetError, match="already has a val split"):
        carve_val_split(read_dataset(tmp_path))

    icfg = tmp_path / "icfg"
    make_dataset(icfg, "icfg-pedes", ids_per_split=1)
    ds = read_dataset(icfg)
    with pytest.raises(DatasetError, match="at least 2"):
        carve_val_split(ds)
    with pytest.raises(DatasetError, match="fraction"):
        carve_val_split(ds, fraction=1.0)


def test_carve_val_split_small_fraction_moves_at_least_one_id(tmp_path: Path):
    make_dataset(tmp_path, "icfg-pedes", ids_per_split=3)
    carved = carve_val_split(read_dataset(tmp_path), fraction=0.01)
    assert len({r.person_id for r in carved.split("val")}) == 1
