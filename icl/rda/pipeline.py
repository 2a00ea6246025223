"""`icl rda`: reorganisation data augmentation of a training set (docs/rda.md).

For each caption of the chosen split: (1) enrich: the 15-question VQA of its image plus the
aggregation of [caption, answers] into one richer description; (2) decompose it into
one-attribute sentences; (3) rewrite each sentence into m paraphrases. The result is stored
next to the caption as `diversity_captions` (per caption: n groups of up to m strings) and
`rda_enriched` (per caption: the enriched description), in the benchmark's own file format.

With an MLLM that generates text all three steps ask it, with the prompts below (the paper's
for VQA and aggregation, icl.mllm.contract). With one that cannot (the demo MLLM) the VQA is
still asked and the rest is the deterministic path of icl.rda.deterministic. The manifest
says which path produced the file.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icl.data.readers import FORMATS, DatasetError, FormatSpec, detect_format
from icl.mllm.contract import VQA_PROMPT, Mllm, aggregate_prompt, parse_answers
from icl.rda import deterministic
from icl.rda.store import STATE_FILE, RdaStore, digest

MANIFEST = "rda-manifest.json"
MANIFEST_FORMAT = "icl-rda/1"
GROUPS_FIELD = "diversity_captions"
ENRICHED_FIELD = "rda_enriched"
MAX_GROUPS = 24  # a generating MLLM may ramble; one caption keeps at most this many groups

DECOMPOSE_PROMPT = (
    "Split the following pedestrian description into short sentences, each describing exactly "
    'one attribute of the person (for example "The person is male." or "The man wears a black '
    'jacket."). Output one sentence per line without any explanation.\nDescription: {text}'
)
REWRITE_PROMPT = (
    "Rewrite the following sentence in {m} different ways with the same meaning, varying the "
    "wording. Output one sentence per line without any explanation.\nSentence: {sentence}"
)

ProgressFn = Callable[[int], None]


class RdaInputError(ValueError):
    """The input cannot be augmented as asked; the message names the records."""


@dataclass(frozen=True)
class RdaOptions:
    paraphrases: int = 5  # m
    split: str | None = "train"  # None: every split
    batch_size: int = 16  # captions per MLLM batch and per committed transaction
    max_tokens: int = 256
    skip_bad: bool = False  # augment the good records; problem ones pass through unchanged


@dataclass(frozen=True)
class Problem:
    record: int
    image: str
    kind: str  # missing_image | empty_caption | duplicate
    detail: str

    def line(self) -> str:
        return f"record {self.record} ({self.image}): {self.detail}"


@dataclass(frozen=True)
class Task:
    record: int
    caption: int
    text: str
    image: Path


@dataclass
class RdaInput:
    annotation: Path
    spec: FormatSpec
    image_root: Path
    raw: list[Any]
    tasks: list[Task]
    problems: list[Problem]
    in_split: list[int]  # indices of the records of the chosen split(s)


@dataclass
class RdaSummary:
    out: Path
    path: str
    model_key: str
    captions: int
    augmented: int
    resumed_from: int  # captions already done when this run started
    problems: Counter = field(default_factory=Counter)
    mllm_calls: int = 0
    cache_hits: int = 0
    seconds: float = 0.0


def _annotation(data: Path, fmt: str | None) -> tuple[Path, FormatSpec]:
    if data.is_dir():
        fmt = fmt or detect_format(data)
        return data / FORMATS[fmt].annotation_file, FORMATS[fmt]
    if fmt is None:
        found = [s for s in FORMATS.values() if s.annotation_file == data.name]
        if not found:
            names = ", ".join(s.annotation_file for s in FORMATS.values())
            raise DatasetError(f"{data}: not a known annotation file name ({names}); pass fmt")
        return data, found[0]
    if fmt not in FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    return data, FORMATS[fmt]


def read_input(data: Path, options: RdaOptions, fmt: str | None = None) -> RdaInput:
    """Validate every record of the split; collect the problems instead of dropping them."""
    ann, spec = _annotation(Path(data), fmt)
    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file not found")
    try:
        raw = json.loads(ann.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{ann}: not valid JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{ann}: expected a non-empty list of records")
    image_root = (ann.parent / spec.image_dir).resolve()
    tasks: list[Task] = []
    problems: list[Problem] = []
    in_split: list[int] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(raw):
        if not isinstance(rec, dict):
            raise DatasetError(f"{ann}: record {i}: is a {type(rec).__name__}, expected an object")
        for key, kind in (("split", str), ("captions", list), (spec.image_key, str)):
            if not isinstance(rec.get(key), kind):
                raise DatasetError(
                    f"{ann}: record {i}: key {key!r} missing or not a {kind.__name__}"
                )
        if options.split is not None and rec["split"] != options.split:
            continue
        in_split.append(i)
        rel = rec[spec.image_key]
        path = image_root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise DatasetError(f"{ann}: record {i}: image path {rel!r} escapes {image_root}")
        if rel in seen:
            problems.append(Problem(i, rel, "duplicate", f"same image as record {seen[rel]}"))
            continue
        seen[rel] = i
        if not path.is_file():
            problems.append(Problem(i, rel, "missing_image", f"image file not found: {path}"))
            continue
        if not rec["captions"]:
            problems.append(Problem(i, rel, "empty_caption", "the captions list is empty"))
        for j, cap in enumerate(rec["captions"]):
            if not isinstance(cap, str):
                raise DatasetError(
                    f"{ann}: record {i}: captions[{j}] is a {type(cap).__name__}, expected a string"
                )
            if not cap.strip():
                problems.append(Problem(i, rel, "empty_caption", f"captions[{j}] is empty"))
                continue
            tasks.append(Task(i, j, cap.strip(), path))
    if not in_split:
        raise RdaInputError(f"{ann}: no record in split {options.split!r}")
    return RdaInput(ann, spec, image_root, raw, tasks, problems, in_split)


def problems_message(inp: RdaInput, limit: int = 10) -> str:
    counts = Counter(p.kind for p in inp.problems)
    head = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in sorted(counts.items()))
    lines = [f"{inp.annotation}: {len(inp.problems)} problem record(s) ({head}):"]
    lines += [f"  {p.line()}" for p in inp.problems[:limit]]
    if len(inp.problems) > limit:
        lines.append(f"  ... and {len(inp.problems) - limit} more")
    return "\n".join(lines)


def _load_image(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class _Asker:
    """MLLM calls through the answer cache; one batch's new answers are kept until commit."""

    def __init__(self, mllm: Mllm, store: RdaStore, max_tokens: int) -> None:
        self.mllm, self.store, self.max_tokens = mllm, store, max_tokens
        self.key = mllm.model_key
        self.pending: dict[tuple[str, str], asyncio.Task[str]] = {}
        self.calls = 0
        self.hits = 0

    async def ask(self, images: list[np.ndarray], image_key: str, prompt: str) -> str:
        cached = self.store.answer(self.key, image_key, prompt)
        if cached is not None:
            self.hits += 1
            return cached
        slot = (image_key, prompt)
        if slot not in self.pending:
            self.calls += 1
            self.pending[slot] = asyncio.ensure_future(
                self.mllm.generate(images, prompt, self.max_tokens)
            )
        return await self.pending[slot]

    def drain(self) -> list[tuple[str, str, str, str]]:
        out = [(self.key, i, p, t.result()) for (i, p), t in self.pending.items() if t.done()]
        self.pending = {}
        return out


async def _augment(
    task: Task, image: np.ndarray, image_key: str, asker: _Asker, m: int, generative: bool
) -> tuple[int, int, str, list[list[str]], str]:
    answers = parse_answers(await asker.ask([image], image_key, VQA_PROMPT))
    if not generative:
        enriched = deterministic.enrich(task.text, answers)
        sentences = deterministic.decompose(task.text, enriched)
        groups = [deterministic.paraphrases(s, m) for s in sentences[:MAX_GROUPS]]
        return task.record, task.caption, enriched, groups, "deterministic"
    enriched = " ".join(
        parse_answers(await asker.ask([], "", aggregate_prompt(task.text, answers)))
    ) or deterministic.enrich(task.text, answers)
    sentences = parse_answers(await asker.ask([], "", DECOMPOSE_PROMPT.format(text=enriched)))
    if not sentences:  # nothing usable came back: split the enriched text by sentence
        sentences = deterministic.split_sentences(enriched)
    sentences = list(dict.fromkeys(sentences))[:MAX_GROUPS]

    async def rewrite(sentence: str) -> list[str]:
        lines = parse_answers(
            await asker.ask([], "", REWRITE_PROMPT.format(m=m, sentence=sentence))
        )
        return list(dict.fromkeys([sentence, *lines]))[:m]

    groups = list(await asyncio.gather(*(rewrite(s) for s in sentences)))
    return task.record, task.caption, enriched, groups, "generative"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


async def run_rda(
    data: Path,
    out: Path,
    mllm: Mllm,
    options: RdaOptions = RdaOptions(),
    *,
    fmt: str | None = None,
    progress: Callable[[int, int], ProgressFn] | None = None,
) -> RdaSummary:
    """Augment `data` into `out`; resumes the run already in `out` (same input and options).

    `progress(total, already_done)` returns a callback that is told how many captions each
    committed batch finished."""
    started = time.perf_counter()
    if options.paraphrases < 1 or options.batch_size < 1:
        raise ValueError("paraphrases and batch_size must be at least 1")
    inp = read_input(data, options, fmt)
    if inp.problems and not options.skip_bad:
        raise RdaInputError(
            problems_message(inp) + "\nFix the records, or pass --skip-bad to augment the "
            "others (problem records are copied to the output unchanged, and counted in "
            f"{MANIFEST})."
        )
    generative = bool(mllm.can_generate)
    path = "generative" if generative else "deterministic"
    out.mkdir(parents=True, exist_ok=True)
    store = RdaStore(out / STATE_FILE)
    try:
        store.bind(
            {
                "input_sha256": digest(inp.annotation.read_bytes()),
                "model_key": mllm.model_key,
                "path": path,
                "paraphrases": options.paraphrases,
                "split": options.split,
                "max_tokens": options.max_tokens,
                "skip_bad": options.skip_bad,
            }
        )
        done = store.done()
        todo = [t for t in inp.tasks if (t.record, t.caption) not in done]
        advance = progress(len(inp.tasks), len(inp.tasks) - len(todo)) if progress else None
        asker = _Asker(mllm, store, options.max_tokens)
        image_keys: dict[Path, str] = {}
        for start in range(0, len(todo), options.batch_size):
            batch = todo[start : start + options.batch_size]
            pixels: dict[Path, np.ndarray] = {}
            for t in batch:
                if t.image not in pixels:
                    pixels[t.image] = _load_image(t.image)
                    if t.image not in image_keys:
                        image_keys[t.image] = digest(t.image.read_bytes())
            results = await asyncio.gather(
                *(
                    _augment(
                        t,
                        pixels[t.image],
                        image_keys[t.image],
                        asker,
                        options.paraphrases,
                        generative,
                    )
                    for t in batch
                )
            )
            store.commit_batch(asker.drain(), results)
            if advance is not None:
                advance(len(batch))
        summary = _assemble(inp, out, store, mllm.model_key, path, options)
        summary.resumed_from = len(inp.tasks) - len(todo)
        summary.mllm_calls, summary.cache_hits = asker.calls, asker.hits
    finally:
        store.close()
    summary.seconds = time.perf_counter() - started
    _write_manifest(inp, out, summary, options)
    return summary


def _assemble(
    inp: RdaInput, out: Path, store: RdaStore, model_key: str, path: str, options: RdaOptions
) -> RdaSummary:
    results = store.results()
    records = []
    in_split = set(inp.in_split)
    for i, rec in enumerate(inp.raw):
        if i in in_split:
            found = [results.get((i, j)) for j in range(len(rec["captions"]))]
            rec = {
                **rec,
                GROUPS_FIELD: [r[1] if r else [] for r in found],
                ENRICHED_FIELD: [r[0] if r else "" for r in found],
            }
        records.append(rec)
    target = out / inp.annotation.name
    _write_atomic(target, json.dumps(records, ensure_ascii=False) + "\n")
    # `out` is a dataset root like the input's: its image folder points at the original one.
    link = out / inp.spec.image_dir
    if not link.exists() and not link.is_symlink():
        link.symlink_to(inp.image_root, target_is_directory=True)
    return RdaSummary(
        out=target,
        path=path,
        model_key=model_key,
        captions=len(inp.tasks),
        augmented=len(results),
        resumed_from=0,
        problems=Counter(p.kind for p in inp.problems),
    )


def _write_manifest(inp: RdaInput, out: Path, s: RdaSummary, options: RdaOptions) -> None:
    steps = (
        {
            "enrich": "MLLM: 15-question VQA + aggregation prompt",
            "decompose": "MLLM: decomposition prompt",
            "rewrite": f"MLLM: rewriting prompt, {options.paraphrases} paraphrases",
        }
        if s.path == "generative"
        else {
            "enrich": "MLLM: 15-question VQA; deterministic merge with the caption",
            "decompose": "deterministic: the caption + one group per answer sentence",
            "rewrite": f"deterministic: template bank, up to {options.paraphrases} paraphrases",
        }
    )
    manifest = {
        "format": MANIFEST_FORMAT,
        "input": str(inp.annotation),
        "input_sha256": digest(inp.annotation.read_bytes()),
        "split": options.split,
        "files": {s.out.name: {"path": s.path, "fields": [GROUPS_FIELD, ENRICHED_FIELD]}},
        "mllm_model_key": s.model_key,
        "path": s.path,
        "steps": steps,
        "paraphrases": options.paraphrases,
        "captions": s.captions,
        "augmented": s.augmented,
        "problems": dict(s.problems),
        "problem_records": [
            {"record": p.record, "image": p.image, "kind": p.kind, "detail": p.detail}
            for p in inp.problems
        ],
        "resumed_from": s.resumed_from,
        "mllm_calls_this_run": s.mllm_calls,
        "cache_hits_this_run": s.cache_hits,
        "seconds_this_run": round(s.seconds, 1),
    }
    _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")


__all__ = [
    "DECOMPOSE_PROMPT",
    "ENRICHED_FIELD",
    "GROUPS_FIELD",
    "MANIFEST",
    "REWRITE_PROMPT",
    "Problem",
    "RdaInput",
    "RdaInputError",
    "RdaOptions",
    "RdaSummary",
    "problems_message",
    "read_input",
    "run_rda",
]
