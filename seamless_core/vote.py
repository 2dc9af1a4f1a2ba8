"""Vector voting: combine K candidate fields so one bad target cannot drag a section away.

SEAMLeSS's rule: for every subset of a strict majority (m = K//2 + 1) of the K candidates, measure how
much its members disagree at each pixel (mean pairwise distance, optionally after a Gaussian blur, so
agreement is judged over a neighbourhood); weight the subsets by a softmin of that disagreement with a
temperature; the voted field is the weighted mean of the subsets' mean fields. A candidate computed
against a black, missing or unrelated section disagrees with the others and its subsets get no weight.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F


def gaussian_blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, C, H, W) with edge replication; identity for sigma <= 0."""
    if sigma <= 0:
        return field
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype, device=field.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    padded = F.pad(field, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def vector_vote(candidates: torch.Tensor, *, temperature: float = 1.0, blur_sigma: float = 2.0,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vote K candidate fields (K, N, 2, H, W) -> (voted field (N, 2, H, W), spread (N, 1, H, W) in px).

    `temperature` (px) sets how sharply the most coherent majority wins; `blur_sigma` (px) the scale
    over which agreement is judged. `valid` (K,) bool drops candidates that do not exist (a skipped
    target). The spread is the weighted disagreement of the winning subsets: near 0 where the
    majority agrees, large where no majority does (a quality map).
    """
    if candidates.dim() != 5 or candidates.shape[2] != 2:
        raise ValueError(f"candidates must be (K, N, 2, H, W), got {tuple(candidates.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 px, got {temperature}")
    if valid is not None:
        candidates = candidates[valid.to(torch.bool)]
    k = candidates.shape[0]
    if k == 0:
        raise ValueError("no valid candidate to vote on")
    if k <= 2:  # no majority to speak of: average, report the disagreement
        spread = (candidates[0] - candidates[-1]).norm(dim=1, keepdim=True)
        return candidates.mean(0), spread
    majority = k // 2 + 1
    judged = torch.stack([gaussian_blur(c, blur_sigma) for c in candidates])
    distance = {
        (i, j): (judged[i] - judged[j]).norm(dim=1, keepdim=True) for i, j in itertools.combinations(range(k), 2)
    }
    subsets = list(itertools.combinations(range(k), majority))
    spreads = torch.stack([
        torch.stack([distance[pair] for pair in itertools.combinations(subset, 2)]).mean(0) for subset in subsets
    ])  # (S, N, 1, H, W)
    weights = torch.softmax(-spreads / temperature, dim=0)
    means = torch.stack([candidates[list(subset)].mean(0) for subset in subsets])  # (S, N, 2, H, W)
    return (weights * means).sum(0), (weights * spreads).sum(0)
