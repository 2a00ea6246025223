"""RDA online: one reorganised caption per step, and the weight of its loss.

`diversity_captions` (icl.rda.pipeline) holds, per caption, n groups of m paraphrases of one
attribute sentence. Each training step shuffles the groups, picks one paraphrase per group
and joins them: an extra positive text for the image, weighted max(0.1, 1 - 0.03 * epoch).
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def reorganise(groups: Sequence[Sequence[str]], rng: random.Random) -> str:
    """Shuffle the groups, pick one paraphrase of each, join with spaces ("" if no groups)."""
    order = list(range(len(groups)))
    rng.shuffle(order)
    picked = [rng.choice(groups[i]) for i in order if groups[i]]
    return " ".join(p.strip() for p in picked)


def rda_weight(epoch: int, floor: float = 0.1, decay: float = 0.03) -> float:
    """Weight of the reorganised positive in (0-based) `epoch`: max(floor, 1 - decay * epoch)."""
    return max(floor, 1.0 - decay * epoch)


__all__ = ["rda_weight", "reorganise"]
