"""Prototype, not in seamless_core: block matching run from several offset inits, the fields' median kept.

Block matching's field depends on where the source sits relative to its sub-pixel grid and patch grid,
so the same content deformed differently gives fields that differ by ~0.5 px at MIP 0
(bench/equivariance.py). Running it from `count` inits offset by fixed, evenly spread sub-pixel and
pixel amounts (a golden-angle spiral within `radius` px at the stage's MIP) and keeping the per-pixel
median averages that dependence out: one chain step's floor off the crack falls from 0.55 / 2.79 to
0.38 / 1.37 px. docs/estimators.md gives what it does to whole chains (nothing good), which is why it is
kept here and not as an estimator parameter.
"""

from __future__ import annotations

import contextlib
import math

import torch

from seamless_core.estimators.base import Pair
from seamless_core.estimators.block_matching import BlockMatching

from estimator_swap import swapped_estimators

COUNT, RADIUS = 8, 4.0


def offsets(count: int, radius: float) -> list[tuple[float, float]]:
    """`count` (dx, dy) spread evenly over a disc of `radius` px: deterministic, every sub-pixel phase."""
    golden_angle = math.pi * (3 - math.sqrt(5))
    return [(radius * math.sqrt((i + 0.5) / count) * math.cos(i * golden_angle),
             radius * math.sqrt((i + 0.5) / count) * math.sin(i * golden_angle)) for i in range(count)]


class Jittered:
    """An estimator run from `count` offset copies of its init; the per-pixel median of the fields."""

    def __init__(self, inner: BlockMatching, count: int = COUNT, radius: float = RADIUS) -> None:
        self.inner, self.count, self.radius = inner, count, radius
        self.margin = inner.margin + math.ceil(radius)

    def __call__(self, pair: Pair, init: torch.Tensor | None = None) -> torch.Tensor:
        n = max(pair.src.shape[0], pair.tgt.shape[0])
        base = init if init is not None else torch.zeros(n, 2, *pair.shape, device=pair.tgt.device)
        shift = torch.zeros_like(base[:1])
        candidates = []
        for dx, dy in offsets(self.count, self.radius):
            shift[:, 0], shift[:, 1] = dx, dy
            candidates.append(self.inner(pair, base + shift))
        return torch.stack(candidates).median(0).values


def jittered_block_matching(count: int = COUNT, radius: float = RADIUS) -> contextlib.AbstractContextManager[None]:
    """Within the block, multiscale.align_pair runs every block-matching stage jittered."""
    return swapped_estimators(
        lambda estimator: Jittered(estimator, count, radius) if isinstance(estimator, BlockMatching) else estimator)
