"""A prototype: an exact pair field projected onto a smooth spline, so that composed chains neither morph
nor random-walk (docs/estimators.md, "Exact fields projected onto a spline").

The exact stages are reproducible per pair (floor 0.14 / 0.43 px) but morph a section into its
neighbour (pair morph 2.6), and composing such fields morphs every section into section 0. Block
matching does not morph but is not reproducible (0.73 / 3.90 px), and its errors random-walk along
a chain. Here the exact field is fitted, by least squares weighted towards textured tissue in both
sections and reweighted with Cauchy weights, with a cubic B-spline whose knots are `spacing` px apart:
the section's own distortions (affine, elastic over >= 128 px) lie in that span, the anatomy's
membrane-scale correspondences do not, and pixels without texture (where the exact field is whatever
its smoothness term made of it) carry no weight.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from seamless_core import fields


@functools.lru_cache(maxsize=8)
def bspline_basis(length: int, spacing: float) -> torch.Tensor:
    """(length, n) cubic B-spline basis over pixel centres 0..length-1 with knots `spacing` px apart."""
    n = int(torch.ceil(torch.tensor((length - 1) / spacing)).item()) + 3
    t = torch.arange(length, dtype=torch.float64)[:, None] / spacing - (torch.arange(n, dtype=torch.float64)[None] - 1)
    a = t.abs()
    return torch.where(a < 1, (4 - 6 * a**2 + 3 * a**3) / 6, torch.where(a < 2, (2 - a) ** 3 / 6, torch.zeros_like(a)))


def texture_weight(image: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """Local gradient energy of an image (N, 1, H, W), normalised to median 1 over tissue."""
    gy, gx = torch.gradient(image[0, 0].double())
    energy = (gx**2 + gy**2)[None, None]
    radius = int(3 * sigma)
    kernel = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    energy = F.conv2d(F.pad(energy, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    energy = F.conv2d(F.pad(energy, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    tissue = image > 0
    return energy / energy[tissue].median().clamp_min(1e-12)


def project(field: torch.Tensor, moving: torch.Tensor, reference: torch.Tensor, *, spacing: float = 64.0,
            mip: int = 2, cauchy: float = 2.0, passes: int = 6, bending: float = 1e-3) -> torch.Tensor:
    """The B-spline field (knots `spacing` px apart at MIP 0) closest to `field` (MIP 0, pull, reference
    frame) where both sections have textured tissue; `bending` keeps unsupported knots smooth."""
    h, w = field.shape[-2:]
    aligned = fields.warp(moving, field)
    valid = ((reference > 0) & (aligned > 0)).double()
    # erode: pixels next to a border, gap or debris see the black across it
    valid = -F.max_pool2d(-valid, 9, stride=1, padding=4)
    weight = valid * texture_weight(reference).clamp(max=4.0) * texture_weight(aligned.where(valid > 0, 0)).clamp(max=4.0)
    factor = 2**mip
    small = fields.resample(field.double(), 0, mip)[0]  # (2, h', w') in MIP-mip px
    weight = F.avg_pool2d(weight, factor)[0, 0]
    by, bx = bspline_basis(small.shape[-2], spacing / factor), bspline_basis(small.shape[-1], spacing / factor)
    design = torch.einsum("yi,xj->yxij", by, bx).reshape(small.shape[-2] * small.shape[-1], -1)
    u = small.permute(1, 2, 0).reshape(-1, 2)
    ny, nx = by.shape[1], bx.shape[1]
    # bending energy on the control grid: second differences along each axis
    eye_y, eye_x = torch.eye(ny, dtype=torch.float64), torch.eye(nx, dtype=torch.float64)
    d2y, d2x = torch.diff(eye_y, 2, dim=0), torch.diff(eye_x, 2, dim=0)
    penalty = torch.kron(d2y.T @ d2y, eye_x) + torch.kron(eye_y, d2x.T @ d2x)
    base = weight.reshape(-1)
    robust = torch.ones_like(base)
    for _ in range(passes):
        wts = (base * robust)[:, None]
        normal = design.T @ (design * wts) + bending * base.sum() * penalty
        coef = torch.linalg.solve(normal, design.T @ (u * wts))
        residual = (u - design @ coef).norm(dim=1)
        robust = 1.0 / (1.0 + (residual / (cauchy / factor)) ** 2)
    smooth = (design @ coef).reshape(small.shape[-2], small.shape[-1], 2).permute(2, 0, 1)[None]
    out = fields.resample(smooth, mip, 0)
    return out[..., :h, :w].float()
