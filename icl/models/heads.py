"""The TSE head of RDE: token selection, a residual MLP, max pooling.

Parameter names follow RDE's `VisualEmbeddingLayer`/`TexualEmbeddingLayer` (`linear`,
`mlp.layers.*`, `mlp.bns.*`) so released checkpoints load without renaming inside the head.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


class _Mlp(nn.Module):
    """Linear -> BN -> ReLU ... -> Linear applied per token ([B, N, C] in and out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int = 2) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))
        # RDE keeps a norm for the output layer too (unused in its forward); keeping it makes
        # its checkpoints load with strict key checking.
        self.bns = nn.ModuleList(nn.BatchNorm1d(d) for d in dims[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = x.reshape(b * n, -1)
        last = len(self.layers) - 1
        for i, (layer, bn) in enumerate(zip(self.layers, self.bns, strict=True)):
            x = layer(x)
            if i < last:
                x = F.relu(bn(x))
        return x.reshape(b, n, -1)


class TseHead(nn.Module):
    """Keep the `k` tokens the global token attends to most; embed; max-pool over them.

    `k = int(selectable * ratio)` where `selectable` is the number of token slots that can
    ever be valid (192 patches for ViT-B/16 at 384x128 -> 57; 75 text slots -> 22). A text
    with fewer valid tokens than `k` is pooled over its valid tokens only, as RDE does.
    """

    def __init__(self, in_dim: int, out_dim: int, ratio: float, selectable: int) -> None:
        super().__init__()
        self.k = max(1, int(selectable * ratio))
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = _Mlp(in_dim, out_dim // 2, out_dim)

    def forward(
        self, tokens: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor:
        # Batches trimmed to their longest caption can hold fewer tokens than k; an exported
        # graph always sees the full length, so tracing keeps k constant.
        k = self.k if torch.jit.is_tracing() else min(self.k, tokens.shape[1])
        # Invalid tokens sort last (attention weights are >= 0).
        ranked = scores.masked_fill(~valid, -1.0)
        top = ranked.topk(k, dim=-1).indices
        picked = torch.gather(tokens, 1, top.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        picked = F.normalize(picked, dim=-1)
        emb = self.mlp(picked) + self.linear(picked)
        # Only the first min(#valid, k) picks are real tokens.
        count = valid.sum(dim=-1, keepdim=True).clamp(min=1, max=k)
        keep = torch.arange(k, device=tokens.device).unsqueeze(0) < count
        emb = emb.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        return emb.max(dim=1).values


__all__ = ["TseHead"]
