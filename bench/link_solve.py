"""A prototype: every section's field solved at once from spline-projected links to K neighbours.

A chain adds each step's error like a random walk. Linking section z to z-1..z-K and solving all the
fields together (section 0 fixed) lets independent links average: for links of equal quality the
error at the end of a chain of n sections falls from about sqrt(n) steps' worth to sqrt(n / sum k^2)
(docs/estimators.md, "One chain step, measured apart"). An earlier solve of this kind on block
matching's dense fields did not settle (gross link failures, membrane-scale anatomy in the links);
here each link is an exact pair field projected onto a spline (bench/smooth_projection.py), which
is smooth, and links that disagree with the rest are cut by Cauchy weights per pixel.

solve: F_z - F_{z-k} = S_{z,k}(p + F_{z-k}(p)) for every link, least squares per pixel at MIP 2,
re-linearised and reweighted over `passes` rounds, started from the K = 1 composition.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from seamless_core import fields

CACHE = Path("/tmp/seamless_link_cache")
MIP = 2


def links(stack: torch.Tensor, estimate, k_targets: int, key: str) -> dict[tuple[int, int], torch.Tensor]:
    """{(z, k): S_{z,k} at MIP 2}, each pair estimated once and cached by the stack's bytes and `key`."""
    digest = hashlib.sha1(stack.numpy().tobytes() + key.encode() + str(k_targets).encode()).hexdigest()[:16]
    path = CACHE / f"{digest}.pt"
    if path.exists():
        return torch.load(path)
    out = {}
    for z in range(1, stack.shape[0]):
        for k in range(1, min(k_targets, z) + 1):
            out[(z, k)] = fields.resample(estimate(stack[z : z + 1], stack[z - k : z - k + 1]), 0, MIP)
    CACHE.mkdir(exist_ok=True)
    torch.save(out, path)
    return out


def solve(link_fields: dict[tuple[int, int], torch.Tensor], n: int, *, cauchy: float = 0.5,
          passes: int = 8) -> list[torch.Tensor]:
    """Per-pixel robust least squares for F_1..F_{n-1} (F_0 = 0) at MIP 2; `cauchy` in MIP-2 px."""
    shape = next(iter(link_fields.values())).shape
    chain = [torch.zeros(shape)]
    for z in range(1, n):  # start: the K = 1 composition
        chain.append(fields.compose(chain[z - 1], link_fields[(z, 1)]))
    unknowns = torch.stack(chain[1:]).double()  # (n-1, 1, 2, H, W)
    pixels = shape[-2] * shape[-1]
    for _ in range(passes):
        current = [torch.zeros(shape, dtype=torch.float64)] + list(unknowns)
        normal = torch.zeros(pixels, n - 1, n - 1, dtype=torch.float64)
        rhs = torch.zeros(pixels, n - 1, 2, dtype=torch.float64)
        for (z, k), s in link_fields.items():
            target = fields.warp(s.double(), current[z - k], padding="border")  # S(p + F_{z-k}(p))
            residual = current[z] - current[z - k] - target
            weight = (1.0 / (1.0 + (residual.norm(dim=1) / cauchy) ** 2)).reshape(pixels)
            d = target[0].reshape(2, pixels).T  # (P, 2)
            i, j = z - 1, z - k - 1  # rows of F_z and F_{z-k}; j = -1 is the fixed section 0
            normal[:, i, i] += weight
            rhs[:, i] += weight[:, None] * d
            if j >= 0:
                normal[:, j, j] += weight
                normal[:, i, j] -= weight
                normal[:, j, i] -= weight
                rhs[:, j] -= weight[:, None] * d
        solution = torch.linalg.solve(normal + 1e-9 * torch.eye(n - 1, dtype=torch.float64), rhs)  # (P, n-1, 2)
        unknowns = solution.permute(1, 2, 0).reshape(n - 1, 1, 2, *shape[-2:])
    return [torch.zeros(shape)] + [f.float() for f in unknowns]


def solve_align(stack: torch.Tensor, estimate, k_targets: int, key: str) -> torch.Tensor:
    """The stack rendered through the solved fields (bench/chain_diagnosis.py --chain solve)."""
    solved = solve(links(stack, estimate, k_targets, key), stack.shape[0])
    return torch.cat([fields.warp(stack[z : z + 1], fields.resample(f, MIP, 0)) for z, f in enumerate(solved)])
