"""Converters from released checkpoints (OpenAI CLIP, RDE/ICL, IRRA) onto our DualEncoder.

Layouts (detected from the keys):
- `openai-clip`: OpenAI's CLIP state dict (`visual.*`, `transformer.*`, `token_embedding.*`,
  ...), as a TorchScript archive (OpenAI's .pt files), a plain state-dict file or a dict.
  The TSE heads have no source: they stay at their initialisation and are reported missing.
- `rde`: RDE/ICL training checkpoints, `{"model": {...}}` with the CLIP weights under
  `base_model.` and the TSE heads as `visul_emb_layer.*` / `texual_emb_layer.*` (RDE's own
  spelling), mapped to `image.tse.*` / `text.tse.*`.
- `irra`: the same `base_model.` layout without TSE heads (reported missing); IRRA's extra
  modules (`classifier`, `cross_attn`, `cross_modal_transformer`, `ln_pre_t`, `ln_pre_i`,
  `ln_post`, `mlm_head`) have no place in our model and are reported unexpected. Any layout
  reports every key it did not use as unexpected.

Transforms: `attn.in_proj_*` is split into q/k/v; `visual.proj` and `text_projection`
(used as `x @ proj`) are transposed into Linear weights; a square image position table is
bilinearly resized to the configured grid (a table already at the grid is copied); the text
position table is cut to `context_length` when shorter (as RDE/IRRA do for 77) and linearly
interpolated (align_corners=True: the first and last rows are kept exactly) when longer, e.g.
77 -> 168 for UFine6926. Every target is shape-checked: a mismatch is an error naming both keys
and both shapes; missing backbone weights are an error (a half-loaded backbone is never useful).
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from icl.models.clip import resize_position_embedding
from icl.models.config import ModelConfig, vit_b16_config
from icl.models.dual_encoder import CHECKPOINT_FORMAT, DualEncoder, save_checkpoint

Layout = Literal["openai-clip", "rde", "irra"]

# Entries of CLIP state dicts that are not weights of the towers (some copies store the
# build metadata as scalars); never loaded, listed in the report as ignored.
_IGNORED = ("logit_scale", "input_resolution", "context_length", "vocab_size")
# Our buffers that come from the config, not from any checkpoint.
_FROM_CONFIG = ("image.mean", "image.std")
_POSITIONS = (
    "image.tower.embeddings.position_embedding",
    "text.tower.embeddings.position_embedding.weight",
)
_HEADS = {"visul_emb_layer.": "image.tse.", "texual_emb_layer.": "text.tse."}
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


class ConversionError(ValueError):
    """A checkpoint that does not fit the configured model, or is not a known layout."""


@dataclass(frozen=True)
class ConversionReport:
    layout: Layout
    source: str
    loaded: int  # model tensors filled from the checkpoint
    missing: tuple[str, ...]  # model keys left at their initialisation (only TSE heads)
    unexpected: tuple[str, ...]  # checkpoint keys (as stored) with no place in the model
    ignored: tuple[str, ...] = ()  # known non-weights (logit_scale, metadata scalars)
    notes: tuple[str, ...] = field(default=())  # resizes and other transforms applied

    def summary(self) -> str:
        parts = [f"{self.layout} checkpoint {self.source}: {self.loaded} tensors loaded"]
        if self.missing:
            heads = sorted({".".join(k.split(".")[:2]) for k in self.missing})
            parts.append(f"{len(self.missing)} missing ({', '.join(heads)} left at init)")
        if self.unexpected:
            roots = sorted({k.split(".")[0] for k in self.unexpected})
            parts.append(f"{len(self.unexpected)} unexpected ignored ({', '.join(roots)})")
        parts.extend(self.notes)
        return "; ".join(parts)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_state(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """The raw dict stored in a checkpoint file (TorchScript archives: their state dict).

    Files are read with `weights_only=True`; `trust_pickle` allows a full unpickling for
    training checkpoints that store other objects (only for files you trust).
    """
    if _is_torchscript(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for one bad file
        if not trust_pickle:
            raise ConversionError(
                f"{path}: cannot be read as weights only ({exc}); if the file is trusted, "
                "retry with trust_pickle=True"
            ) from None
        blob = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(blob, dict):
        raise ConversionError(f"{path}: holds a {type(blob).__name__}, not a state dict")
    return blob


def _unwrap(blob: Mapping[str, Any]) -> dict[str, Any]:
    if blob.get("format") == CHECKPOINT_FORMAT:
        raise ConversionError("already an icl dual-encoder checkpoint: use load_checkpoint")
    for key in ("model", "state_dict"):  # IRRA/RDE's Checkpointer stores {"model": ...}
        if isinstance(blob.get(key), Mapping):
            blob = blob[key]
            break
    state = dict(blob)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def detect_layout(state: Mapping[str, Any]) -> Layout:
    keys = list(state)
    if any(k.startswith("base_model.") for k in keys):
        if any(k.startswith(tuple(_HEADS)) for k in keys):
            return "rde"
        return "irra"
    if "visual.conv1.weight" in state:
        return "openai-clip"
    raise ConversionError(
        f"unknown checkpoint layout (expected OpenAI CLIP, RDE or IRRA keys); first keys: "
        f"{keys[:6]}"
    )


def _clip_targets(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
    """Our model keys (and tensors) for one OpenAI-CLIP key; None when it has no place.

    Position tables are returned unresized (the caller fits them to the model).
    """
    if key.startswith("visual."):
        tower, key = "image.tower.", key.removeprefix("visual.")
        simple = {
            "class_embedding": "embeddings.class_embedding",
            "positional_embedding": "embeddings.position_embedding",
            "conv1.weight": "embeddings.patch_embedding.weight",
            "ln_pre.weight": "pre_layernorm.weight",
            "ln_pre.bias": "pre_layernorm.bias",
            "ln_post.weight": "post_layernorm.weight",
            "ln_post.bias": "post_layernorm.bias",
        }
        projection = "proj"
    else:
        tower = "text.tower."
        simple = {
            "token_embedding.weight": "embeddings.token_embedding.weight",
            "positional_embedding": "embeddings.position_embedding.weight",
            "ln_final.weight": "final_layer_norm.weight",
            "ln_final.bias": "final_layer_norm.bias",
        }
        projection = "text_projection"
    if key in simple:
        return [(tower + simple[key], value)]
    if key == projection:  # CLIP computes x @ proj; a Linear computes x @ W.T
        return [(tower + "proj.weight", value.t())]
    if m := _IN_PROJ.match(key):
        layer, kind = m.groups()
        q, k, v = value.chunk(3, dim=0)
        base = f"{tower}encoder.layers.{layer}.self_attn."
        return [(f"{base}{n}_proj.{kind}", t) for n, t in zip("qkv", (q, k, v), strict=True)]
    if m := _RESBLOCK.match(key):
        layer, module, kind = m.groups()
        if module in _BLOCK:
            return [(f"{tower}encoder.layers.{layer}.{_BLOCK[module]}.{kind}", value)]
    return None


def _fit_positions(
    target: str,
    key: str,
    table: torch.Tensor,
    expect: torch.Size,
    grid: tuple[int, int],
    notes: list[str],
) -> torch.Tensor:
    """Fit a position table to the model's row count (the width is checked by the caller)."""
    rows, src = expect[0], table.shape[0]
    if table.dim() != 2 or src == rows:
        return table
    if target.startswith("image."):
        side = math.isqrt(src - 1)
        if side * side != src - 1:
            raise ConversionError(
                f"{key} -> {target}: checkpoint shape {tuple(table.shape)} vs model shape "
                f"{tuple(expect)}: only a square table can be resized"
            )
        notes.append(f"image positions resized {side}x{side} -> {grid[0]}x{grid[1]} (bilinear)")
        return resize_position_embedding(table, grid)
    if rows < src:
        notes.append(f"text positions cut {src} -> {rows}")
        return table[:rows]
    notes.append(f"text positions interpolated {src} -> {rows} (linear)")
    grown = F.interpolate(
        table.float().t().unsqueeze(0), size=rows, mode="linear", align_corners=True
    )
    return grown.squeeze(0).t().to(table.dtype)


def _check_config(cfg: ModelConfig) -> None:
    if cfg.image_tower.kind != "clip_vit" or cfg.text_tower.kind != "clip_transformer":
        raise ConversionError(
            "CLIP/RDE/IRRA checkpoints need clip_vit and clip_transformer towers, got "
            f"{cfg.image_tower.kind} and {cfg.text_tower.kind}"
        )


def convert_state(
    blob: Mapping[str, Any], cfg: ModelConfig | None = None, source: str = "<dict>"
) -> tuple[DualEncoder, ConversionReport]:
    """Convert an in-memory checkpoint (any supported layout); see `convert_checkpoint`."""
    state = _unwrap(blob)
    layout = detect_layout(state)
    prefix = "" if layout == "openai-clip" else "base_model."
    if cfg is None:
        # The paper's model; keep the checkpoint's text length (77, or 168 for UFine).
        text_pos = state.get(prefix + "positional_embedding")
        length = text_pos.shape[0] if isinstance(text_pos, torch.Tensor) else 77
        cfg = vit_b16_config(context_length=length)
    _check_config(cfg)
    # Heads without a source keep their initialisation: seed it so that converting the same
    # file twice gives the same model, without touching the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DualEncoder(cfg)
    own = model.state_dict()
    grid = model.image.tower.embeddings.grid

    filled: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    ignored: list[str] = []
    notes: list[str] = []
    for key, value in state.items():
        targets: list[tuple[str, Any]] | None = None
        if key.startswith(prefix):
            inner = key.removeprefix(prefix)
            if inner in _IGNORED:
                ignored.append(key)
                continue
            if isinstance(value, torch.Tensor):
                targets = _clip_targets(inner, value)
        if layout != "openai-clip" and key.startswith(tuple(_HEADS)):
            head = next(h for h in _HEADS if key.startswith(h))
            targets = [(_HEADS[head] + key.removeprefix(head), value)]
        if not targets or any(t not in own for t, _ in targets):
            unexpected.append(key)
            continue
        for target, tensor in targets:
            if not isinstance(tensor, torch.Tensor):
                raise ConversionError(f"{key}: expected a tensor, got {type(tensor).__name__}")
            expect = own[target].shape
            if target in _POSITIONS:
                tensor = _fit_positions(target, key, tensor, expect, grid, notes)
            if tensor.shape != expect:
                raise ConversionError(
                    f"{key} -> {target}: checkpoint shape {tuple(tensor.shape)} vs model shape "
                    f"{tuple(expect)}"
                )
            filled[target] = tensor.to(own[target].dtype)

    missing = [k for k in own if k not in filled and k not in _FROM_CONFIG]
    backbone = [k for k in missing if ".tower." in k]
    if backbone:
        raise ConversionError(
            f"{layout} checkpoint {source} lacks {len(backbone)} backbone weights of the "
            f"configured model (layers or towers do not match?), e.g. {backbone[:4]}"
        )
    own.update(filled)
    model.load_state_dict(own, strict=True)
    report = ConversionReport(
        layout=layout,
        source=source,
        loaded=len(filled),
        missing=tuple(missing),
        unexpected=tuple(unexpected),
        ignored=tuple(ignored),
        notes=tuple(notes),
    )
    return model.eval(), report


def convert_checkpoint(
    path_or_state: Path | str | Mapping[str, Any],
    cfg: ModelConfig | None = None,
    *,
    trust_pickle: bool = False,
) -> tuple[DualEncoder, ConversionReport]:
    """Load an OpenAI CLIP / RDE / ICL / IRRA checkpoint into a DualEncoder (eval mode).

    `path_or_state` is a file (TorchScript archive, plain state dict, or a training
    checkpoint with a `model` entry) or the loaded dict. `cfg` defaults to the paper's ViT-B/16
    model with the checkpoint's text length.
    """
    if isinstance(path_or_state, Mapping):
        return convert_state(path_or_state, cfg)
    path = Path(path_or_state)
    return convert_state(read_state(path, trust_pickle), cfg, source=str(path))


def convert_to_file(
    src: Path | str,
    dst: Path,
    cfg: ModelConfig | None = None,
    *,
    half: bool = False,
    trust_pickle: bool = False,
) -> ConversionReport:
    """Convert `src` and write one of our checkpoints (loadable with `load_checkpoint`)."""
    model, report = convert_checkpoint(src, cfg, trust_pickle=trust_pickle)
    extra = {
        "converted_from": report.source,
        "layout": report.layout,
        "missing": list(report.missing),
        "unexpected": list(report.unexpected),
        "summary": report.summary(),
    }
    save_checkpoint(model, dst, half=half, extra=extra)
    return report


__all__ = [
    "ConversionError",
    "ConversionReport",
    "Layout",
    "convert_checkpoint",
    "convert_state",
    "convert_to_file",
    "detect_layout",
    "read_state",
]
