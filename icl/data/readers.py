"""Read the four text-to-image ReID benchmarks (CUHK-PEDES, ICFG-PEDES, RSTPReid, UFine6926).

Each benchmark ships one JSON list with one record per image; the images live under
`<root>/imgs/` as the IRRA/RDE code lays them out. Every reader here validates every record
and fails with a `DatasetError` naming the file, the record index and the key: a bad record is
never dropped silently, because a quietly smaller test split changes every reported metric.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SPLIT_ORDER = ("train", "val", "test")
_DRIVE = re.compile(r"[A-Za-z]:")
_SEPARATORS = re.compile(r"[/\\]")


class DatasetError(ValueError):
    """An annotation file or image folder is unusable; the message names the file and record."""


@dataclass(frozen=True)
class FormatSpec:
    name: str
    annotation_file: str  # file name directly under the dataset root
    image_key: str  # record key holding the image path, relative to the image folder
    image_dir: str  # image folder, relative to the dataset root
    splits: tuple[str, ...]  # the splits a record of this format may carry


FORMATS: dict[str, FormatSpec] = {
    "cuhk-pedes": FormatSpec("cuhk-pedes", "reid_raw.json", "file_path", "imgs", SPLIT_ORDER),
    "icfg-pedes": FormatSpec(
        "icfg-pedes", "ICFG-PEDES.json", "file_path", "imgs", ("train", "test")
    ),
    "rstpreid": FormatSpec("rstpreid", "data_captions.json", "img_path", "imgs", SPLIT_ORDER),
    # The method notes do not pin UFine6926's split names; accept the full set.
    "ufine6926": FormatSpec(
        "ufine6926", "UFine6926_Annotations_1024.json", "file_path", "imgs", SPLIT_ORDER
    ),
}


@dataclass(frozen=True)
class ImageRecord:
    image_path: Path  # absolute path of the image file
    person_id: int  # as in the file
    captions: tuple[str, ...]  # non-empty strings, stripped
    split: str  # "train" | "val" | "test"
    # RDA (`icl rda`, docs/rda.md): per caption, groups of paraphrases of one attribute
    # sentence each; empty when the file has no `diversity_captions`.
    diversity: tuple[tuple[tuple[str, ...], ...], ...] = ()


def _split_key(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


@dataclass(frozen=True)
class ReidDataset:
    format: str
    root: Path
    records: tuple[ImageRecord, ...]

    def split(self, name: str) -> list[ImageRecord]:
        out = [r for r in self.records if r.split == name]
        if not out:
            present = ", ".join(self.splits()) or "none"
            raise DatasetError(
                f"{self.format} dataset at {self.root} has no {name!r} split (present: {present})"
            )
        return out

    def splits(self) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for r in self.records:
            counts[r.split] += 1
        return {name: counts[name] for name in sorted(counts, key=_split_key)}

    def summary(self) -> str:
        parts = []
        for name in self.splits():
            recs = [r for r in self.records if r.split == name]
            n_caps = sum(len(r.captions) for r in recs)
            n_ids = len({r.person_id for r in recs})
            parts.append(f"{name} {len(recs)} images / {n_caps} captions / {n_ids} ids")
        return f"{self.format} ({self.root}): " + "; ".join(parts)


def detect_format(root: Path) -> str:
    """The format whose annotation file exists directly under `root`."""
    root = Path(root)
    found = [name for name, spec in FORMATS.items() if (root / spec.annotation_file).is_file()]
    if len(found) == 1:
        return found[0]
    if found:
        # Two annotation files in one folder: guessing would read the wrong benchmark.
        files = ", ".join(FORMATS[n].annotation_file for n in found)
        raise DatasetError(f"{root}: several annotation files found ({files}); pass fmt=")
    looked = ", ".join(spec.annotation_file for spec in FORMATS.values())
    raise DatasetError(f"{root}: no annotation file found; looked for {looked}")


def read_dataset(
    root: Path,
    fmt: str | None = None,
    *,
    check_images: bool = True,
    image_root: Path | None = None,
) -> ReidDataset:
    """Read and validate one benchmark. `image_root` overrides `<root>/<spec.image_dir>`."""
    root = Path(root).resolve()
    if fmt is None:
        fmt = detect_format(root)
    spec = FORMATS.get(fmt)
    if spec is None:
        raise DatasetError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    ann = root / spec.annotation_file
    images = Path(image_root).resolve() if image_root is not None else root / spec.image_dir

    raw = _load_json_list(ann)
    records = tuple(_parse_record(ann, i, item, spec, images) for i, item in enumerate(raw))
    if check_images:
        _check_images_exist(ann, records, images)
    return ReidDataset(format=fmt, root=root, records=records)


def carve_val_split(dataset: ReidDataset, fraction: float = 0.1, seed: int = 0) -> ReidDataset:
    """Move a deterministic `fraction` of train identities (whole identities) to "val".

    For formats without a val split (ICFG-PEDES). Test records are never touched. Whole
    identities move so that no person is seen in training and then used for validation.
    """
    counts = dataset.splits()
    if "val" in counts:
        raise DatasetError(f"{dataset.format} dataset at {dataset.root} already has a val split")
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"fraction must be in (0, 1), got {fraction}")
    train_ids = sorted({r.person_id for r in dataset.split("train")})
    if len(train_ids) < 2:
        raise DatasetError(
            f"{dataset.format} dataset at {dataset.root}: {len(train_ids)} train identities; "
            "need at least 2 to carve a val split"
        )
    # At least one id moves and at least one stays, whatever the fraction.
    n_val = min(max(1, round(fraction * len(train_ids))), len(train_ids) - 1)
    val_ids = set(random.Random(seed).sample(train_ids, n_val))
    records = tuple(
        replace(r, split="val") if r.split == "train" and r.person_id in val_ids else r
        for r in dataset.records
    )
    return replace(dataset, records=records)


def _load_json_list(ann: Path) -> list[Any]:
    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file not found")
    try:
        with ann.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{ann}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{ann}: not UTF-8 text: {e}") from None
    if not isinstance(data, list):
        raise DatasetError(f"{ann}: top-level value is a {type(data).__name__}, expected a list")
    if not data:
        raise DatasetError(f"{ann}: the list of records is empty")
    return data


def _parse_record(ann: Path, i: int, item: Any, spec: FormatSpec, images: Path) -> ImageRecord:
    where = f"{ann}: record {i}"
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: is a {type(item).__name__}, expected an object")

    def get(key: str, kind: type, kind_name: str) -> Any:
        if key not in item:
            raise DatasetError(f"{where}: missing key {key!r}")
        value = item[key]
        # bool is a subclass of int, but `true` as an id is a broken file, not person 1.
        if not isinstance(value, kind) or isinstance(value, bool):
            raise DatasetError(
                f"{where}: key {key!r} is a {type(value).__name__}, expected {kind_name}"
            )
        return value

    split = get("split", str, "a string")
    if split not in spec.splits:
        raise DatasetError(
            f"{where}: key 'split' is {split!r}; {spec.name} allows {', '.join(spec.splits)}"
        )
    pid = get("id", int, "an integer")
    if pid < 0:
        raise DatasetError(f"{where}: key 'id' is negative ({pid})")
    caps = get("captions", list, "a list of strings")
    if not caps:
        raise DatasetError(f"{where}: key 'captions' is an empty list")
    captions = []
    for j, cap in enumerate(caps):
        if not isinstance(cap, str):
            raise DatasetError(
                f"{where}: key 'captions'[{j}] is a {type(cap).__name__}, expected a string"
            )
        cap = cap.strip()
        if not cap:
            raise DatasetError(f"{where}: key 'captions'[{j}] is empty")
        captions.append(cap)
    rel = get(spec.image_key, str, "a string")
    return ImageRecord(
        image_path=Path(images, _safe_relative(where, spec.image_key, rel)),
        person_id=pid,
        captions=tuple(captions),
        split=split,
        diversity=_parse_diversity(where, item.get("diversity_captions"), len(captions)),
    )


def _parse_diversity(
    where: str, value: Any, n_captions: int
) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """`diversity_captions`: one list per caption of groups (lists of non-empty strings)."""
    if value is None:
        return ()
    bad = f"{where}: key 'diversity_captions'"
    if not isinstance(value, list) or len(value) != n_captions:
        raise DatasetError(f"{bad} must be a list with one entry per caption ({n_captions})")
    out = []
    for j, groups in enumerate(value):
        if not isinstance(groups, list) or not all(
            isinstance(g, list) and g and all(isinstance(s, str) and s.strip() for s in g)
            for g in groups
        ):
            raise DatasetError(f"{bad}[{j}] must be a list of non-empty lists of non-empty strings")
        out.append(tuple(tuple(s.strip() for s in g) for g in groups))
    return tuple(out)


def _safe_relative(where: str, key: str, rel: str) -> str:
    """`rel` as a normalised relative path that stays under the image folder.

    String checks rather than PurePath objects: this runs once per record and pathlib parsing
    dominated the read time of a 100k-record file.
    """
    if "\x00" in rel:
        raise DatasetError(f"{where}: key {key!r} contains a NUL byte")
    # Annotations written on Windows may use either separator or a drive letter.
    if rel.startswith(("/", "\\")) or _DRIVE.match(rel):
        raise DatasetError(f"{where}: key {key!r} is an absolute path ({rel!r})")
    if ".." in _SEPARATORS.split(rel):
        raise DatasetError(f"{where}: key {key!r} escapes the image folder ({rel!r})")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or not rel.strip():
        raise DatasetError(f"{where}: key {key!r} is an empty path")
    return "/".join(parts)


def _check_images_exist(ann: Path, records: Iterable[ImageRecord], images: Path) -> None:
    # One directory listing per folder instead of one stat per image: benchmarks put thousands
    # of images in a handful of folders, so this is a few syscalls for 100k records.
    listings: dict[Path, frozenset[str]] = {}
    missing: list[tuple[int, Path]] = []
    for i, rec in enumerate(records):
        folder = rec.image_path.parent
        names = listings.get(folder)
        if names is None:
            names = listings[folder] = _list_files(folder)
        if rec.image_path.name not in names:
            missing.append((i, rec.image_path))
    if missing:
        i, path = missing[0]
        more = f" ({len(missing) - 1} more images missing)" if len(missing) > 1 else ""
        hint = "" if images.is_dir() else f"; the image folder {images} does not exist"
        raise DatasetError(f"{ann}: record {i}: image file not found: {path}{hint}{more}")


def _list_files(folder: Path) -> frozenset[str]:
    try:
        with os.scandir(folder) as it:
            # DirEntry.is_file uses the type from the listing; it stats only symlinks.
            return frozenset(e.name for e in it if e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return frozenset()
