"""`icl train`: fit a dual encoder on (image, caption) pairs, select it on the val split.

The run directory holds `last.pt` (everything needed to resume: weights, optimiser,
scheduler, epoch, best score) and `best.pt` (an icl dual-encoder checkpoint, selected on
val, never on test), plus `history.jsonl` (one line of losses and val metrics per epoch).
A run resumes at the start of the epoch after the last one completed; epochs draw their
shuffles and augmentations from generators seeded by (seed, epoch), so a resumed run
continues with the batches an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl.data.readers import ImageRecord
from icl.evaluation import RetrievalSet, evaluate, load_pixels, retrieval_set
from icl.metrics import RetrievalMetrics
from icl.models.dual_encoder import (
    DualEncoder,
    Embeddings,
    build_model,
    check_fixed_references,
    fixed_references,
    save_checkpoint,
)
from icl.rda.reorganise import rda_weight, reorganise
from icl.training.cache import FeatureCache, default_cache_dir
from icl.training.config import RunConfig, TrainConfig
from icl.training.losses import sdm_loss, tal_loss
from icl.training.progress import Progress

STATE_FORMAT = "icl-train-state/2"  # 2: three parameter groups


@dataclass(frozen=True)
class PairSet:
    """Training pairs: every caption with its image; images held at model size in memory."""

    pixels: torch.Tensor  # uint8 [images, H, W, 3]
    ids: torch.Tensor  # int64 [pairs, L] caption tokens
    image_of_pair: torch.Tensor  # int64 [pairs]
    pid_of_pair: torch.Tensor  # int64 [pairs]
    # RDA: per pair, the caption's paraphrase groups (empty tuple: none); see icl.rda.
    rda_groups: tuple[tuple[tuple[str, ...], ...], ...] = ()


def pair_set(
    records: Sequence[ImageRecord],
    size: tuple[int, int],
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    progress: Callable[[int], None] | None = None,
) -> PairSet:
    pixels = load_pixels([r.image_path for r in records], size, progress)
    captions = [c for r in records for c in r.captions]
    image_of_pair = [i for i, r in enumerate(records) for _ in r.captions]
    pid_of_pair = [r.person_id for r in records for _ in r.captions]
    rda_groups = tuple(
        (r.diversity[j] if r.diversity else ()) for r in records for j in range(len(r.captions))
    )
    return PairSet(
        torch.from_numpy(pixels),
        torch.from_numpy(tokenizer(captions)),
        torch.tensor(image_of_pair),
        torch.tensor(pid_of_pair),
        rda_groups if any(rda_groups) else (),
    )


def rda_texts(pairs: PairSet, batch: torch.Tensor, rng: random.Random) -> list[str] | None:
    """One reorganised caption per pair of the batch; None when no pair of it has groups
    (a pair without groups contributes nothing: its row is masked out of the RDA loss)."""
    groups = [pairs.rda_groups[i] for i in batch.tolist()]
    if not any(groups):
        return None
    return [reorganise(g, rng) if g else "" for g in groups]


def augment_images(pixels: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Flip, zero-pad + random crop, random erasing (with noise) on a uint8 batch."""
    b, h, w, _ = pixels.shape
    x = pixels
    if cfg.flip:
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.view(b, 1, 1, 1), x.flip(2), x)
    if cfg.pad:
        p = cfg.pad
        padded = torch.zeros((b, h + 2 * p, w + 2 * p, 3), dtype=x.dtype)
        padded[:, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (dy.view(b, 1) + torch.arange(h)).view(b, h, 1).expand(b, h, w)
        cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, w).expand(b, h, w)
        x = padded[torch.arange(b).view(b, 1, 1), rows, cols]
    if cfg.erasing:
        x = x.clone()
        for i in torch.nonzero(torch.rand(b, generator=gen) < cfg.erasing).flatten().tolist():
            area = h * w * (0.02 + 0.3 * torch.rand(1, generator=gen).item())
            aspect = math.exp(
                math.log(0.3)
                + (math.log(3.3) - math.log(0.3)) * torch.rand(1, generator=gen).item()
            )
            eh = min(h, max(1, round(math.sqrt(area * aspect))))
            ew = min(w, max(1, round(math.sqrt(area / aspect))))
            y0 = int(torch.randint(0, h - eh + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, w - ew + 1, (1,), generator=gen))
            x[i, y0 : y0 + eh, x0 : x0 + ew] = torch.randint(
                0, 256, (eh, ew, 3), dtype=torch.uint8, generator=gen
            )
    return x


def augment_text(ids: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Delete or replace (half each) inner caption tokens with probability p; keep SOS/EOT."""
    if p <= 0:
        return ids
    out = torch.zeros_like(ids)
    pool = ids[ids > 0]
    for row in range(ids.shape[0]):
        seq = ids[row][ids[row] > 0]
        inner = seq[1:-1].clone()
        draw = torch.rand(len(inner), generator=gen)
        replace = draw < p / 2
        delete = (draw >= p / 2) & (draw < p)
        if replace.any():
            pick = torch.randint(0, len(pool), (int(replace.sum()),), generator=gen)
            inner[replace] = pool[pick]
        kept = inner[~delete] if (~delete).any() else inner[:1]
        new = torch.cat([seq[:1], kept, seq[-1:]])
        out[row, : len(new)] = new
    return out


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop padding columns that no caption in the batch uses (towers mask padding anyway)."""
    used = int((ids != 0).sum(dim=1).max())
    return ids[:, : max(used, 3)]


def parameter_group(name: str) -> str:
    """Which learning-rate group a model parameter belongs to: "tse" (the TSE heads),
    "projection" (a tower's projection to the joint width and its pooling: BGE) or
    "tower" (the backbone)."""
    parts = name.split(".")
    if parts[1] == "tse":
        return "tse"
    if parts[1] == "tower" and parts[2] in ("proj", "pool"):
        return "projection"
    return "tower"


class Optimiser:
    """AdamW over dense parameters (one group per `parameter_group`, each with its learning
    rate) plus SparseAdam over sparse embeddings, stepped together."""

    def __init__(self, model: DualEncoder, cfg: TrainConfig) -> None:
        sparse_ids = {
            id(m.weight)
            for m in model.modules()
            if isinstance(m, torch.nn.Embedding) and m.sparse and m.weight.requires_grad
        }
        groups: dict[str, list[torch.nn.Parameter]] = {"tower": [], "projection": [], "tse": []}
        sparse = []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in sparse_ids:
                sparse.append(param)
            else:
                groups[parameter_group(name)].append(param)
        lrs = {"tower": cfg.lr, "projection": cfg.proj_lr or cfg.lr, "tse": cfg.head_lr}
        self.groups = {name: len(params) for name, params in groups.items()}
        self.dense = torch.optim.AdamW(
            [
                {"params": groups[g], "lr": lrs[g], "name": g}
                for g in ("tower", "projection", "tse")
            ],
            weight_decay=cfg.weight_decay,
        )
        self.parts = [self.dense]
        if sparse:
            self.parts.append(torch.optim.SparseAdam([{"params": sparse, "lr": cfg.lr}]))

    def zero_grad(self) -> None:
        for opt in self.parts:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.parts:
            opt.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.parts]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.parts, states, strict=True):
            opt.load_state_dict(state)


def _schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return cfg.warmup_factor + (1 - cfg.warmup_factor) * step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass(frozen=True)
class CachedFeatures:
    """Frozen towers' cached outputs for the training pairs (None: that tower runs)."""

    image: tuple[torch.Tensor, ...] | None = None  # row per image
    text: tuple[torch.Tensor, ...] | None = None  # row per pair
    image_flipped: tuple[torch.Tensor, ...] | None = None  # the mirrored images (`flip`)


def _batch_parts(
    model: DualEncoder,
    pairs: PairSet,
    batch: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    cached: CachedFeatures,
) -> tuple[Embeddings, Embeddings]:
    """Image and caption embeddings of a batch; augmentations draw from `gen` in the same
    order whether or not features are cached (cached towers see no augmentation)."""
    images = pairs.image_of_pair[batch]
    if cached.image is not None:
        fixed = tuple(f[images] for f in cached.image)
        if cached.image_flipped is not None:
            # The draw augment_images makes for `flip` (the only image augmentation a
            # cached tower allows), so cached and uncached runs see the same flips.
            flip = torch.rand(len(images), generator=gen) < 0.5
            fixed = tuple(
                torch.where(flip.view(-1, *[1] * (f.dim() - 1)), g[images], f)
                for f, g in zip(fixed, cached.image_flipped, strict=True)
            )
        img = model.image.parts_from_fixed(fixed)
    else:
        img = model.image.parts(augment_images(pairs.pixels[images], cfg, gen))
    if cached.text is not None:
        ids = trim_padding(pairs.ids[batch])
        length = ids.shape[1]
        txt = model.text.parts_from_fixed(ids, tuple(f[batch][:, :length] for f in cached.text))
    else:
        txt = model.text.parts(trim_padding(augment_text(pairs.ids[batch], cfg.text_aug, gen)))
    return img, txt


def _loss(
    model: DualEncoder,
    img: Embeddings,
    txt: Embeddings,
    pids: torch.Tensor,
    cfg: TrainConfig,
    extra: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """The loss over (image, caption) pairs; `extra` = (ids, row mask, weight) adds the
    same loss over (image, reorganised caption) for the masked rows, times the weight."""
    loss = _pair_loss(img, txt, pids, cfg)
    if extra is not None:
        rda_ids, rows, weight = extra
        if int(rows.sum()) >= 2:
            sub_img = Embeddings(img.bge[rows], img.tse[rows] if img.tse is not None else None)
            sub_txt = model.text.parts(rda_ids[rows])
            loss = loss + weight * _pair_loss(sub_img, sub_txt, pids[rows], cfg)
    return loss


def _pair_loss(img, txt, pids, cfg: TrainConfig) -> torch.Tensor:
    if cfg.loss == "tal":

        def fn(a, b):
            return tal_loss(a, b, pids, cfg.tal_tau, cfg.tal_margin)
    else:

        def fn(a, b):
            return sdm_loss(a, b, pids, cfg.sdm_scale)

    loss = fn(img.bge, txt.bge)
    if img.tse is not None and txt.tse is not None:
        loss = loss + fn(img.tse, txt.tse)
    return loss


@dataclass(frozen=True)
class TrainResult:
    best_epoch: int
    best_val: dict[str, float | int]
    seconds: float
    run_dir: Path


def machine_threads() -> int:
    """The cores this process may run on (affinity aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cache_plan(model: DualEncoder, cfg: TrainConfig) -> tuple[bool, bool, list[str]]:
    """Whether to cache the image / text tower's features, and why not where a frozen tower
    is not cached (one line each)."""
    notes = []
    image = text = False
    if model.image.cacheable:
        # Flips are cached too (a second set of features); crops and erasing are not.
        augmented = [n for n, on in (("pad", cfg.pad), ("erasing", cfg.erasing)) if on]
        if not cfg.cache_features:
            notes.append("image tower is frozen; cache_features = false: it runs every step")
        elif augmented:
            notes.append(
                f"image tower is frozen but augmented ({', '.join(augmented)}): it runs every "
                "step; set pad = 0, erasing = 0 to cache its features (flips can stay)"
            )
        else:
            image = True
    if model.text.cacheable:
        if not cfg.cache_features:
            notes.append("text tower is frozen; cache_features = false: it runs every step")
        elif cfg.text_aug:
            notes.append(
                "text tower is frozen but augmented (text_aug): it runs every step; set "
                "text_aug = 0 to cache its features"
            )
        else:
            text = True
    return image, text, notes


class InitError(ValueError):
    """A --init-from checkpoint that cannot start this run."""


def init_from_checkpoint(model: DualEncoder, path: Path) -> tuple[int, int, list[str]]:
    """Copy every tensor of `path` (an icl checkpoint, or a run's last.pt) whose name and
    shape match into `model`; the rest keep their initialisation. Returns (copied, of the
    model's, names left at initialisation)."""
    from icl.models.dual_encoder import CheckpointError, load_checkpoint

    if not path.is_file():
        raise InitError(f"--init-from {path}: no such file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise InitError(f"--init-from {path}: not a readable torch checkpoint ({exc})") from None
    if isinstance(blob, dict) and blob.get("format", "").startswith("icl-train-state/"):
        source = blob["model"]
    else:
        try:
            source = load_checkpoint(path).state_dict()
        except CheckpointError as exc:
            raise InitError(f"--init-from {exc}") from None
    target = model.state_dict()
    copied = {k for k, v in source.items() if k in target and target[k].shape == v.shape}
    if not copied:
        raise InitError(f"--init-from {path}: shares no tensor (name and shape) with this model")
    with torch.no_grad():
        for key in copied:
            target[key].copy_(source[key])
    left = sorted(k for k in target if k not in copied)
    return len(copied), len(target), left


def _run_differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _run_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


# Settings that may change between a run and its resumption: they do not change the result.
_RESUMABLE = ("threads", "cache_dir")


def _resume_view(run: dict[str, Any]) -> dict[str, Any]:
    train = {k: v for k, v in run.get("train", {}).items() if k not in _RESUMABLE}
    return {**run, "train": train}


def train(
    run: RunConfig,
    train_records: Sequence[ImageRecord],
    val_records: Sequence[ImageRecord],
    run_dir: Path,
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    *,
    resume: bool = False,
    init_from: Path | None = None,
    data_note: str = "",
    show_progress: bool = True,
    progress: Progress | None = None,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train, evaluate on val every epoch, keep the best; see the module docstring.

    `init_from` starts the weights from a checkpoint (warm start: optimiser and schedule
    start fresh, so the trainable set may differ from the checkpoint's run). `progress`
    (default: bars on a terminal, plain lines otherwise; none if not `show_progress`)."""
    cfg = run.train
    torch.set_num_threads(cfg.threads or machine_threads())
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "last.pt"
    if state_path.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run (last.pt): pass --resume to continue it, "
            "or choose another --out"
        )
    resuming = resume and state_path.exists()
    state: dict[str, Any] | None = None
    if resuming:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{state_path}: written by another version of icl train ({state.get('format')}, "
                f"expected {STATE_FORMAT}): start a new run, e.g. with --init-from "
                f"{run_dir / 'best.pt'}"
            )
        differences = _run_differences(
            _resume_view(state["run"]), _resume_view(run.model_dump(mode="json"))
        )
        if differences:
            raise ValueError(
                f"{state_path} was written by a different run configuration "
                f"({'; '.join(differences[:3])}): --resume continues an identical run; to "
                f"start a changed one from its weights use --init-from {state_path} with "
                "another --out"
            )
    size = run.model.image_size
    model = build_model(run.model, seed=cfg.seed)
    bars = progress if progress is not None else Progress(enabled=show_progress)
    with bars:
        if init_from is not None and not resuming:
            copied, total, left = init_from_checkpoint(model, init_from)
            bars.log(
                f"init from {init_from}: {copied} of {total} tensors"
                + (f"; at initialisation: {', '.join(left[:4])}" if left else "")
                + (" ..." if len(left) > 4 else "")
            )
        elif init_from is not None:
            bars.log(f"resuming {state_path}: --init-from {init_from} was applied at its start")
        loading = bars.task("loading train images", total=len(train_records))
        pairs = pair_set(train_records, size, tokenizer, lambda n: loading.advance(n))
        loading = bars.task("loading val images", total=len(val_records))
        val = retrieval_set(val_records, size, lambda n: loading.advance(n))

        if cfg.rda.enabled and not pairs.rda_groups:
            raise ValueError(
                "train.rda is enabled but the training records have no diversity_captions: "
                "run `icl rda` on the data set and train on its output (docs/rda.md)"
            )
        steps_per_epoch = len(pairs.ids) // cfg.batch_size
        if steps_per_epoch < 1:
            raise ValueError(
                f"{len(pairs.ids)} training pairs do not fill one batch of {cfg.batch_size}"
            )
        optimiser = Optimiser(model, cfg)
        factor = _schedule(cfg, steps_per_epoch)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimiser.parts]
        start_epoch, best_score, best_epoch, best_val, spent = 0, -1.0, -1, {}, 0.0
        if state is not None:
            fixed_refs = state.get("fixed_references") or {}
            check_fixed_references(model, fixed_refs, state_path)
            result = model.load_state_dict(state["model"], strict=not fixed_refs)
            if result.unexpected_keys:
                raise ValueError(f"{state_path}: unexpected weights {result.unexpected_keys[:5]}")
            optimiser.load_state_dict(state["optimiser"])
            for sched, sched_state in zip(schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(sched_state)
            start_epoch, best_score = state["epoch"] + 1, state["best_score"]
            best_epoch, best_val, spent = state["best_epoch"], state["best_val"], state["seconds"]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        bars.log(
            f"{trainable:,} trainable parameters; groups (tensors): "
            + ", ".join(f"{g} {n}" for g, n in optimiser.groups.items())
            + f"; {torch.get_num_threads()} torch threads"
        )

        cache_image, cache_text, notes = cache_plan(model, cfg)
        for note in notes:
            bars.log(note)
        cache = (
            FeatureCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
            if cache_image or cache_text
            else None
        )
        cached = CachedFeatures()
        if cache is not None:
            model.eval()
            started = time.perf_counter()
            flips = cache_image and cfg.flip
            task = bars.task(
                "caching frozen features",
                total=len(pairs.pixels) * (cache_image + flips) + len(pairs.ids) * cache_text,
            )
            cached = CachedFeatures(
                cache.image_features(model, pairs.pixels, task.advance) if cache_image else None,
                cache.text_features(model, pairs.ids, task.advance) if cache_text else None,
                cache.image_features(model, pairs.pixels.flip(2), task.advance) if flips else None,
            )
            bars.log(
                f"frozen features ({'image' if cache_image else ''}"
                f"{' + ' if cache_image and cache_text else ''}{'text' if cache_text else ''}) "
                f"from {cache.directory}: {cache.hits} read, {cache.misses} computed in "
                f"{time.perf_counter() - started:.1f} s"
            )
        fixed_refs = fixed_references(model) if cfg.omit_frozen_weights else {}
        omitted = {k for ref in fixed_refs.values() for k in ref["keys"]}

        epoch_task = bars.task("epochs", total=cfg.epochs, completed=start_epoch)
        step_task = bars.task("steps", total=steps_per_epoch)
        eval_task = bars.task("val", total=len(val.query_texts) + len(val.gallery_pixels))
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            # RDA draws from its own generator: turning it on leaves every other draw as is.
            rda_rng = random.Random(cfg.seed * 100_003 + epoch)
            weight = rda_weight(epoch, cfg.rda.weight_floor, cfg.rda.weight_decay)
            order = torch.randperm(len(pairs.ids), generator=gen)
            model.train()
            total_loss = 0.0
            step_task.reset(steps_per_epoch)
            for step in range(steps_per_epoch):
                batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                img, txt = _batch_parts(model, pairs, batch, cfg, gen, cached)
                extra = None
                if cfg.rda.enabled:
                    texts = rda_texts(pairs, batch, rda_rng)
                    if texts is not None:
                        rows = torch.tensor([bool(t) for t in texts])
                        extra = (trim_padding(torch.from_numpy(tokenizer(texts))), rows, weight)
                loss = _loss(model, img, txt, pairs.pid_of_pair[batch], cfg, extra)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                for sched in schedulers:
                    sched.step()
                total_loss += float(loss.detach())
                step_task.advance(1, f"epoch {epoch} loss {float(loss.detach()):.3f}")
            eval_task.reset()
            metrics = evaluate(model, val, tokenizer, cache, eval_task.advance)
            spent += time.perf_counter() - started
            score = getattr(metrics, cfg.select_metric)
            record = {
                "epoch": epoch,
                "loss": total_loss / steps_per_epoch,
                "lr": schedulers[0].get_last_lr()[0],
                "seconds": round(spent, 1),
                "val": metrics.as_dict(),
            }
            if score > best_score:
                best_score, best_epoch, best_val = score, epoch, metrics.as_dict()
                save_checkpoint(
                    model,
                    run_dir / "best.pt",
                    extra={"epoch": epoch, "val": best_val, "data": data_note},
                    omit_fixed=cfg.omit_frozen_weights,
                )
            with (run_dir / "history.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            new_state = {
                "format": STATE_FORMAT,
                "run": run.model_dump(mode="json"),
                "model": {k: v for k, v in model.state_dict().items() if k not in omitted},
                "fixed_references": fixed_refs,
                "optimiser": optimiser.state_dict(),
                "schedulers": [sched.state_dict() for sched in schedulers],
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_val": best_val,
                "seconds": spent,
            }
            tmp = state_path.with_name("last.pt.tmp")
            torch.save(new_state, tmp)
            tmp.replace(state_path)
            epoch_task.advance(
                1,
                f"val R1 {metrics.r1:.1f} mAP {metrics.map:.1f} (best epoch {best_epoch}); "
                f"loss {record['loss']:.3f}",
            )
            if epoch_callback is not None:
                epoch_callback(epoch, record)
    return TrainResult(best_epoch, best_val, spent, run_dir)


def metrics_table_rows(metrics: RetrievalMetrics) -> list[str]:
    return [
        f"{metrics.r1:.2f}",
        f"{metrics.r5:.2f}",
        f"{metrics.r10:.2f}",
        f"{metrics.map:.2f}",
        f"{metrics.minp:.2f}",
        f"{metrics.rsum:.2f}",
    ]


__all__ = [
    "CachedFeatures",
    "InitError",
    "PairSet",
    "RetrievalSet",
    "TrainResult",
    "augment_images",
    "augment_text",
    "cache_plan",
    "init_from_checkpoint",
    "machine_threads",
    "metrics_table_rows",
    "pair_set",
    "parameter_group",
    "rda_texts",
    "train",
]
