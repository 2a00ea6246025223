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
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from icl.data.readers import ImageRecord
from icl.evaluation import RetrievalSet, evaluate, load_pixels, retrieval_set
from icl.metrics import RetrievalMetrics
from icl.models.dual_encoder import DualEncoder, Embeddings, build_model, save_checkpoint
from icl.rda.reorganise import rda_weight, reorganise
from icl.training.config import RunConfig, TrainConfig
from icl.training.losses import sdm_loss, tal_loss

STATE_FORMAT = "icl-train-state/1"


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


class Optimiser:
    """AdamW over dense parameters plus SparseAdam over sparse embeddings, stepped together."""

    def __init__(self, model: DualEncoder, cfg: TrainConfig) -> None:
        sparse_ids = {
            id(m.weight)
            for m in model.modules()
            if isinstance(m, torch.nn.Embedding) and m.sparse and m.weight.requires_grad
        }
        heads, towers, sparse = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in sparse_ids:
                sparse.append(param)
            else:
                (heads if ".tse." in name else towers).append(param)
        self.dense = torch.optim.AdamW(
            [
                {"params": towers, "lr": cfg.lr, "name": "towers"},
                {"params": heads, "lr": cfg.head_lr, "name": "heads"},
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


def _loss(
    model: DualEncoder,
    pixels,
    ids,
    pids,
    cfg: TrainConfig,
    extra: tuple[torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """The loss over (image, caption) pairs; `extra` = (ids, row mask, weight) adds the
    same loss over (image, reorganised caption) for the masked rows, times the weight."""
    img = model.image.parts(pixels)
    loss = _pair_loss(img, model.text.parts(ids), pids, cfg)
    if extra is not None:
        rda_ids, rows, weight = extra
        if int(rows.sum()) >= 2:
            sub_img = Embeddings(img.bge[rows], img.tse[rows] if img.tse is not None else None)
            txt = model.text.parts(rda_ids[rows])
            loss = loss + weight * _pair_loss(sub_img, txt, pids[rows], cfg)
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


def train(
    run: RunConfig,
    train_records: Sequence[ImageRecord],
    val_records: Sequence[ImageRecord],
    run_dir: Path,
    tokenizer: Callable[[Sequence[str]], np.ndarray],
    *,
    resume: bool = False,
    data_note: str = "",
    show_progress: bool = True,
    epoch_callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> TrainResult:
    cfg = run.train
    torch.set_num_threads(cfg.threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "last.pt"
    if state_path.exists() and not resume:
        raise FileExistsError(
            f"{run_dir} already holds a run (last.pt): pass --resume to continue it, "
            "or choose another --out"
        )
    size = run.model.image_size
    model = build_model(run.model, seed=cfg.seed)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, disable=not show_progress, transient=False) as bars:
        task = bars.add_task("loading train images", total=len(train_records), info="")
        pairs = pair_set(train_records, size, tokenizer, lambda n: bars.advance(task, n))
        val = retrieval_set(val_records, size)

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
        if resume and state_path.exists():
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            if state.get("format") != STATE_FORMAT or state["run"] != run.model_dump(mode="json"):
                raise ValueError(f"{state_path} was written by a different run configuration")
            model.load_state_dict(state["model"])
            optimiser.load_state_dict(state["optimiser"])
            for sched, sched_state in zip(schedulers, state["schedulers"], strict=True):
                sched.load_state_dict(sched_state)
            start_epoch, best_score = state["epoch"] + 1, state["best_score"]
            best_epoch, best_val, spent = state["best_epoch"], state["best_val"], state["seconds"]

        epoch_task = bars.add_task("epochs", total=cfg.epochs, completed=start_epoch, info="")
        step_task = bars.add_task("steps", total=steps_per_epoch, info="")
        for epoch in range(start_epoch, cfg.epochs):
            started = time.perf_counter()
            gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
            # RDA draws from its own generator: turning it on leaves every other draw as is.
            rda_rng = random.Random(cfg.seed * 100_003 + epoch)
            weight = rda_weight(epoch, cfg.rda.weight_floor, cfg.rda.weight_decay)
            order = torch.randperm(len(pairs.ids), generator=gen)
            model.train()
            total_loss = 0.0
            bars.reset(step_task, total=steps_per_epoch)
            for step in range(steps_per_epoch):
                batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                pixels = augment_images(pairs.pixels[pairs.image_of_pair[batch]], cfg, gen)
                ids = trim_padding(augment_text(pairs.ids[batch], cfg.text_aug, gen))
                extra = None
                if cfg.rda.enabled:
                    texts = rda_texts(pairs, batch, rda_rng)
                    if texts is not None:
                        rows = torch.tensor([bool(t) for t in texts])
                        extra = (trim_padding(torch.from_numpy(tokenizer(texts))), rows, weight)
                loss = _loss(model, pixels, ids, pairs.pid_of_pair[batch], cfg, extra)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                for sched in schedulers:
                    sched.step()
                total_loss += float(loss.detach())
                bars.update(step_task, advance=1, info=f"loss {float(loss.detach()):.3f}")
            metrics = evaluate(model, val, tokenizer)
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
                )
            with (run_dir / "history.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            state = {
                "format": STATE_FORMAT,
                "run": run.model_dump(mode="json"),
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "schedulers": [sched.state_dict() for sched in schedulers],
                "epoch": epoch,
                "best_score": best_score,
                "best_epoch": best_epoch,
                "best_val": best_val,
                "seconds": spent,
            }
            tmp = state_path.with_name("last.pt.tmp")
            torch.save(state, tmp)
            tmp.replace(state_path)
            bars.update(
                epoch_task,
                advance=1,
                info=f"val R1 {metrics.r1:.1f} mAP {metrics.map:.1f} (best epoch {best_epoch})",
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
    "PairSet",
    "RetrievalSet",
    "TrainResult",
    "augment_images",
    "augment_text",
    "metrics_table_rows",
    "pair_set",
    "rda_texts",
    "train",
]
