"""`icl train-mllm`: train the demo MLLM's two networks on the synthetic world.

- AttributeNet: the train split's crops with the generator's labels as targets ("unseen"
  where the view hides the attribute), selected on val accuracy;
- CaptionParser: captions written on the fly by the world's caption writer with the exact
  attributes each one states as targets (fresh identities, not the dataset's);
- the P(Yes) calibration: a 1-D logistic fit of the likelihood ratio on val pairs (a caption
  with another image of its identity vs with an image of the most similar other identity).
Test identities are only used for the final, reported accuracies.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from icl.data.readers import ImageRecord, read_dataset
from icl.evaluation import load_pixels
from icl.mllm.contract import VQA_QUESTIONS
from icl.mllm.demo import (
    ATTRIBUTE_NAMES,
    IMAGE_SIZE,
    QUESTION_ATTRIBUTES,
    AttributeNet,
    Calibration,
    CaptionParser,
    DemoMllm,
    head_sizes,
    split_heads,
)
from icl.synthetic.captions import caption_with_mentions
from icl.synthetic.schema import (
    ATTRIBUTES,
    DIFFICULTIES,
    Person,
    draw_view,
    sample_person,
    visible_attributes,
)
from icl.text.tokenizer import ClipTokenizer

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LabelledImages:
    pixels: torch.Tensor  # uint8 [N, 128, 48, 3]
    labels: torch.Tensor  # int64 [N, attributes]; the last class of a head = unseen
    person_ids: np.ndarray
    captions: list[tuple[str, ...]]


def _labels(record: dict[str, str]) -> list[int]:
    looks: dict[str, Any] = {a: record[a] for a in ATTRIBUTE_NAMES}
    person = Person(person_id=0, **looks)
    visible = set(visible_attributes(person, record["view"]))
    return [
        ATTRIBUTES[a].index(record[a]) if a in visible else len(ATTRIBUTES[a])
        for a in ATTRIBUTE_NAMES
    ]


def labelled_images(root: Path, records: Sequence[ImageRecord]) -> LabelledImages:
    """Crops of `records` with the generator's labels from `attributes.json` (training only)."""
    labels = json.loads((root / "attributes.json").read_text())
    image_root = root / "imgs"
    rows = [
        _labels(labels[r.image_path.relative_to(image_root.resolve()).as_posix()]) for r in records
    ]
    pixels = load_pixels([r.image_path for r in records], IMAGE_SIZE)
    return LabelledImages(
        torch.from_numpy(pixels),
        torch.tensor(rows),
        np.array([r.person_id for r in records]),
        [r.captions for r in records],
    )


def _head_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    losses = [F.cross_entropy(part, labels[:, i]) for i, part in enumerate(split_heads(logits))]
    return cast(torch.Tensor, sum(losses))


@torch.no_grad()
def head_accuracy(net: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    net.eval()
    preds = []
    for start in range(0, len(inputs), 512):
        logits = net(inputs[start : start + 512])
        preds.append(torch.stack([p.argmax(dim=1) for p in split_heads(logits)], dim=1))
    return (torch.cat(preds) == labels).float().mean(dim=0).numpy()


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = pixels.shape[0]
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip.view(b, 1, 1, 1), pixels.flip(2), pixels)
    shift = int(torch.randint(-3, 4, (1,), generator=gen))
    return torch.roll(x, shifts=shift, dims=1)


def train_attribute_net(
    train: LabelledImages,
    val: LabelledImages,
    epochs: int,
    log: Progress,
    seed: int = 0,
    channels: Sequence[int] = (32, 64, 96, 128),
) -> tuple[AttributeNet, np.ndarray]:
    torch.manual_seed(seed)
    net = AttributeNet(channels)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    size = min(128, len(train.pixels))  # the batch; a tiny split trains in one batch
    steps = epochs * (len(train.pixels) // size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train.pixels), generator=gen)
        for start in range(0, len(order) - size + 1, size):
            batch = order[start : start + size]
            loss = _head_loss(net(_augment(train.pixels[batch], gen)), train.labels[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = head_accuracy(net, val.pixels, val.labels)
        log(f"attribute net epoch {epoch}: val mean accuracy {acc.mean():.3f}")
        if acc.mean() > best:
            best, best_state = (
                float(acc.mean()),
                {k: v.clone() for k, v in net.state_dict().items()},
            )
    assert best_state is not None  # set in the first epoch
    net.load_state_dict(best_state)
    return net.eval(), head_accuracy(net, val.pixels, val.labels)


def synthetic_captions(count: int, seed: int) -> tuple[list[str], torch.Tensor]:
    """Captions of fresh identities and, per attribute, the value each states (or none)."""
    rng = np.random.default_rng(seed)
    ranges = [d.mention_range for d in DIFFICULTIES.values()]
    texts, rows = [], []
    for i in range(count):
        person = sample_person(rng, i)
        view = draw_view(rng)
        lo, hi = ranges[i % len(ranges)]
        text, mentions = caption_with_mentions(
            person, rng, view=view, mention_range=(lo * 0.8, min(1.0, hi * 1.2))
        )
        texts.append(text)
        rows.append(
            [
                ATTRIBUTES[a].index(mentions[a]) if a in mentions else len(ATTRIBUTES[a])
                for a in ATTRIBUTE_NAMES
            ]
        )
    return texts, torch.tensor(rows)


def train_parser(
    count: int, epochs: int, log: Progress, seed: int = 0
) -> tuple[CaptionParser, np.ndarray]:
    torch.manual_seed(seed)
    tok = ClipTokenizer(77)
    texts, labels = synthetic_captions(count, seed=seed + 1_000_003)
    val_texts, val_labels = synthetic_captions(max(1000, count // 10), seed=seed + 2_000_003)
    ids, val_ids = torch.from_numpy(tok(texts)), torch.from_numpy(tok(val_texts))
    net = CaptionParser()
    dense = [p for n, p in net.named_parameters() if n != "embed.weight"]
    opts = [
        torch.optim.AdamW(dense, lr=3e-3, weight_decay=1e-4),
        torch.optim.SparseAdam([net.embed.weight], lr=3e-3),
    ]
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(ids), generator=gen)
        size = min(256, len(order))
        for start in range(0, len(order) - size + 1, size):
            batch = order[start : start + size]
            cut = int((ids[batch] != 0).sum(dim=1).max())
            loss = _head_loss(net(ids[batch, :cut]), labels[batch])
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for opt in opts:
                opt.step()
        acc = head_accuracy(net, val_ids, val_labels)
        log(f"caption parser epoch {epoch}: val mean accuracy {acc.mean():.4f}")
    return net.eval(), head_accuracy(net, val_ids, val_labels)


def label_prior(train: LabelledImages) -> list[np.ndarray]:
    prior = []
    for i, attr in enumerate(ATTRIBUTE_NAMES):
        n = len(ATTRIBUTES[attr])
        counts = np.bincount(train.labels[:, i].numpy(), minlength=n + 1)[:n] + 1.0
        prior.append(counts / counts.sum())
    return prior


def calibration_pairs(
    val: LabelledImages, seed: int = 0
) -> tuple[list[int], list[str], np.ndarray]:
    """(image index, caption, is-same-identity) pairs: each caption with another image of its
    identity, with an image of a random other identity and with one of the identity whose
    labels differ least from it (as in a base ranking's top candidates, some of these fit
    the caption exactly: no verifier can tell them apart)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(val.person_ids)
    by_id = {int(p): np.flatnonzero(val.person_ids == p) for p in ids}
    first = {p: int(idx[0]) for p, idx in by_id.items()}
    lab = val.labels.numpy()
    images, texts, same = [], [], []
    for p, idx in by_id.items():
        dist = [(int((lab[first[p]] != lab[first[q]]).sum()), q) for q in by_id if q != p]
        nearest = min(dist)[1]
        for i in idx:
            for caption in val.captions[i]:
                others = [j for j in idx if j != i] or [i]
                stranger = int(rng.choice([q for q in by_id if q != p]))
                images += [
                    int(rng.choice(others)),
                    int(rng.choice(by_id[nearest])),
                    int(rng.choice(by_id[stranger])),
                ]
                texts += [caption] * 3
                same += [1, 0, 0]
    return images, texts, np.array(same, dtype=np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def fit_calibration(llr: np.ndarray, same: np.ndarray, l2: float = 1e-2) -> Calibration:
    """L2-regularised logistic regression of same-identity on the likelihood ratio (Newton);
    the penalty keeps the scale finite when the pairs are nearly separable."""
    w = np.array([0.1, 0.0])  # scale, offset
    x = np.stack([llr, np.ones_like(llr)], axis=1)
    n = len(llr)
    for _ in range(100):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - same) / n + l2 * np.array([w[0], 0.0])
        hess = (x * (p * (1 - p))[:, None]).T @ x / n + np.diag([l2, 1e-9])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    scale = max(float(w[0]), 1e-3)
    return Calibration(scale=scale, bias=float(-w[1] / scale))


def question_accuracy(model: DemoMllm, data: LabelledImages) -> dict[str, float]:
    """Per VQA question: share of crops where every attribute it covers is answered right
    (a confident wrong value is wrong; "cannot tell" is wrong unless the truth is unseen)."""
    probs = []
    for start in range(0, len(data.pixels), 512):
        probs.append(model.image_probs(list(data.pixels[start : start + 512].numpy())))
    per_attr = [np.concatenate([p[i] for p in probs]) for i in range(len(ATTRIBUTE_NAMES))]
    labels = data.labels.numpy()
    out = {}
    for q, attrs in zip(VQA_QUESTIONS, QUESTION_ATTRIBUTES, strict=True):
        if not attrs:
            continue
        ok = np.ones(len(labels), dtype=bool)
        for attr in attrs:
            i = ATTRIBUTE_NAMES.index(attr)
            p = per_attr[i]
            pred = p.argmax(axis=1)
            unsure = p.max(axis=1) < model.min_confidence
            pred = np.where(unsure, p.shape[1] - 1, pred)
            ok &= pred == labels[:, i]
        out[q] = float(ok.mean())
    return out


def train_demo_mllm(
    data: Path,
    image_epochs: int,
    parser_captions: int,
    parser_epochs: int,
    log: Progress,
    channels: Sequence[int] = (48, 96, 144, 192),
) -> tuple[DemoMllm, dict]:
    started = time.perf_counter()
    torch.set_num_threads(1)
    dataset = read_dataset(data)
    train = labelled_images(data, dataset.split("train"))
    val = labelled_images(data, dataset.split("val"))
    attributes, image_acc = train_attribute_net(train, val, image_epochs, log, channels=channels)
    parser, text_acc = train_parser(parser_captions, parser_epochs, log)
    model = DemoMllm(attributes, parser, Calibration(), label_prior(train), key="training")
    images, texts, same = calibration_pairs(val)
    image_p = model.image_probs(list(val.pixels[images].numpy()))
    llr = model.llr(image_p, model.text_probs(texts))
    model.calibration = fit_calibration(llr, same)
    yes = _sigmoid(model.calibration.scale * (llr - model.calibration.bias)) > 0.5
    test = labelled_images(data, dataset.split("test"))
    report = {
        "seconds": round(time.perf_counter() - started, 1),
        "val_attribute_accuracy": dict(zip(ATTRIBUTE_NAMES, map(float, image_acc), strict=True)),
        "parser_accuracy": dict(zip(ATTRIBUTE_NAMES, map(float, text_acc), strict=True)),
        "val_pair_accuracy": float((yes == same.astype(bool)).mean()),
        "calibration": [model.calibration.scale, model.calibration.bias],
        "test_attribute_accuracy": dict(
            zip(
                ATTRIBUTE_NAMES,
                map(float, head_accuracy(attributes, test.pixels, test.labels)),
                strict=True,
            )
        ),
        "test_question_accuracy": question_accuracy(model, test),
        "heads": head_sizes(),
    }
    return model, report


__all__ = ["train_demo_mllm"]
