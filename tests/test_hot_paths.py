"""Hot-path rewrites (issue 8) give the results of the straightforward formulations they replace.

* vote: the Gaussian blur as shifted in-place sums instead of a grouped conv2d, |v| as hypot instead of
  .norm(dim=1), the subset means without an (S, N, 2, H, W) stack: same voted field and spread;
* block matching: patches correlated in groups of PATCH_GROUP[device] (bounded memory): same field and quality.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from seamless_core.estimators import block_matching
from seamless_core.estimators.base import Pair
from seamless_core.estimators.block_matching import BlockMatching
from seamless_core.vote import gaussian_blur, vector_vote

from conftest import sample_section


def reference_blur(field: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=field.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = field.shape[1]
    padded = F.pad(field, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def reference_vote(candidates: torch.Tensor, temperature: float, blur_sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = candidates.shape[0]
    majority = k // 2 + 1
    judged = torch.stack([reference_blur(c, blur_sigma) for c in candidates])
    distance = {(i, j): (judged[i] - judged[j]).norm(dim=1, keepdim=True) for i, j in itertools.combinations(range(k), 2)}
    subsets = list(itertools.combinations(range(k), majority))
    spreads = torch.stack([torch.stack([distance[p] for p in itertools.combinations(s, 2)]).mean(0) for s in subsets])
    weights = torch.softmax(-spreads / temperature, dim=0)
    means = torch.stack([candidates[list(s)].mean(0) for s in subsets])
    return (weights * means).sum(0), (weights * spreads).sum(0)


def test_blur_equals_the_convolution() -> None:
    field = torch.randn(2, 2, 37, 53, generator=torch.Generator().manual_seed(0))
    for sigma in (0.7, 2.0, 3.5):
        assert torch.allclose(gaussian_blur(field, sigma), reference_blur(field, sigma), atol=1e-5)


def test_vote_equals_the_straightforward_formulation() -> None:
    g = torch.Generator().manual_seed(1)
    for k in (3, 5):
        base = torch.randn(1, 2, 40, 48, generator=g) * 3
        candidates = torch.stack([base + torch.randn(1, 2, 40, 48, generator=g) * (0.2 + 2 * (i == 0)) for i in range(k)])
        for temperature in (0.5, 1.0):
            voted, spread = vector_vote(candidates, temperature=temperature, blur_sigma=2.0)
            want_voted, want_spread = reference_vote(candidates, temperature, 2.0)
            assert torch.allclose(voted, want_voted, atol=1e-4)
            assert torch.allclose(spread, want_spread, atol=1e-4)


def test_block_matching_in_patch_groups_gives_the_same_result(monkeypatch) -> None:
    image = torch.from_numpy(sample_section(0)[:160, :160] / 255.0).float()[None, None]
    src = torch.roll(image, shifts=(3, -2), dims=(-2, -1))
    tgt = image[..., 16:144, 16:144].contiguous()
    pair = Pair(src=src, tgt=tgt, offset=(16, 16))
    monkeypatch.setattr(block_matching, "PATCH_GROUP", {"cpu": 10**9})  # every patch at once
    whole, q_whole = BlockMatching(search_radius=8).match(pair, None)
    monkeypatch.setattr(block_matching, "PATCH_GROUP", {"cpu": 40})  # 16 patches per row: 2 rows per group
    grouped, q_grouped = BlockMatching(search_radius=8).match(pair, None)
    assert torch.equal(whole, grouped)
    assert torch.equal(q_whole.accepted, q_grouped.accepted) and torch.equal(q_whole.peak, q_grouped.peak)
