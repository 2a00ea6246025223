"""Training objectives of docs/method.md section 2: TAL (RDE) and SDM (IRRA).

Both take L2-normalised image and text features of a batch of (image, caption) pairs and
the person ids; every pair of the same id is a positive, in both directions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _same_id(pids: torch.Tensor) -> torch.Tensor:
    return (pids.view(-1, 1) == pids.view(1, -1)).to(torch.float32)


def tal_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    pids: torch.Tensor,
    tau: float = 0.015,
    margin: float = 0.1,
) -> torch.Tensor:
    """Triplet alignment loss, summed over the batch and both directions.

    For each anchor: the positives weighted by their softmax(score / tau) (a soft hardest
    positive, no gradient through the weights) against tau * log-sum-exp(negatives / tau)
    (a soft hardest negative), hinged at `margin`.
    """
    labels = _same_id(pids)
    negatives = 1.0 - labels
    scores = text @ image.T  # [texts, images]
    loss = image.new_zeros(())
    for s in (scores, scores.T):
        # exp(s / tau) is at most e^(1/0.015) ~ 1e29 for cosines: finite in fp32.
        expd = (s / tau).exp()
        weights = (expd * labels / (expd * labels).sum(dim=1, keepdim=True)).detach()
        pos = (weights * s).sum(dim=1)
        neg = tau * (expd * negatives).sum(dim=1).clamp(min=1e-30, max=1e35).log()
        loss = loss + (neg - pos + margin).clamp(min=0).sum()
    return loss


def sdm_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    pids: torch.Tensor,
    scale: float = 50.0,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """Similarity distribution matching: KL(softmax(scale * cos) || normalised same-id)."""
    labels = _same_id(pids)
    target = labels / labels.sum(dim=1, keepdim=True)
    t2i = scale * (text @ image.T)
    loss = image.new_zeros(())
    for logits in (t2i, t2i.T):
        pred = logits.softmax(dim=1)
        kl = pred * (F.log_softmax(logits, dim=1) - torch.log(target + epsilon))
        loss = loss + kl.sum(dim=1).mean()
    return loss


LOSSES = {"tal": tal_loss, "sdm": sdm_loss}

__all__ = ["LOSSES", "sdm_loss", "tal_loss"]
