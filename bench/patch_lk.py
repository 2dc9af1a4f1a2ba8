"""Prototype, not in seamless_core: a per-patch affine Lucas-Kanade refinement of a field.

Block matching's sub-pixel estimate (a parabola through the NCC peak at MIP 2) is not equivariant:
the same content shifted by a fractional amount gives a field that differs by ~0.4 px at MIP 0
(bench/equivariance.py). This refinement works at MIP 0 on the field it is given: on a grid of
Gaussian-windowed patches (`stride`, `sigma`) it fits each patch's shift and 2 x 2 Jacobian by
Gauss-Newton on contrast-normalised images, first blurred by `levels[0]` px, then by the next levels
(a wider basin first, so two different starting fields reach the same minimum), and builds the dense
field as a Gaussian blend of the patches' local affine models, each weighted by its tissue cover and
by its agreement with the median of its 5 x 5 neighbours (a soft weight, so no hard accept/reject
decision flips between two nearly equal inputs). docs/estimators.md gives what it does to one
serial step and to whole chains; it is kept here, not as an estimator, because chains did not improve.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seamless_core.estimators.block_matching import gaussian_blur, masked_blur


def normalised(img: torch.Tensor, valid: torch.Tensor, blur: float, window: float = 16.0) -> torch.Tensor:
    """The image blurred by `blur` px, minus its local mean, over its local std (`window` px), 0 off tissue."""
    img = masked_blur(img, valid, blur) if blur > 0 else img
    weight = valid.float()
    norm = gaussian_blur(weight, window).clamp_min(1e-3)
    mean = gaussian_blur(img * weight, window) / norm
    var = gaussian_blur(img * img * weight, window) / norm - mean**2
    return torch.where(valid, (img - mean) / var.clamp_min(1e-6).sqrt(), torch.zeros_like(img))


def gradients(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences along x and y (0 on the outermost rows and columns)."""
    gx, gy = torch.zeros_like(img), torch.zeros_like(img)
    gx[..., :, 1:-1] = (img[..., :, 2:] - img[..., :, :-2]) / 2
    gy[..., 1:-1, :] = (img[..., 2:, :] - img[..., :-2, :]) / 2
    return gx, gy


def refine(src: torch.Tensor, tgt: torch.Tensor, init: torch.Tensor, *, stride: int = 32, sigma: float = 32.0,
           half: int = 64, iterations: int = 8, levels: tuple[float, ...] = (3.0, 1.0), soft: float = 2.0,
           min_cover: float = 0.3, max_jacobian: float = 0.3, ridge: float = 0.02) -> torch.Tensor:
    """The field (1, 2, H, W; pull, MIP 0) refined from `init` so that warp(src, field) ~ tgt patch by patch."""
    h, w = tgt.shape[-2:]
    src_valid, tgt_valid = src > 0, tgt > 0
    cy = torch.arange(stride // 2, h, stride, dtype=torch.float32)
    cx = torch.arange(stride // 2, w, stride, dtype=torch.float32)
    ny, nx = len(cy), len(cx)
    off = torch.arange(-half, half + 1, dtype=torch.float32)
    size = len(off)
    py = (cy.view(ny, 1, 1, 1) + off.view(1, 1, -1, 1)).expand(ny, nx, size, size)
    px = (cx.view(1, nx, 1, 1) + off.view(1, 1, 1, -1)).expand(ny, nx, size, size)
    oy, ox = py - cy.view(ny, 1, 1, 1), px - cx.view(1, nx, 1, 1)
    window = torch.exp(-0.5 * (off / sigma) ** 2)
    window = (window.view(-1, 1) * window.view(1, -1)).expand(ny, nx, -1, -1)
    inside = (py >= 0) & (py <= h - 1) & (px >= 0) & (px <= w - 1)

    def sample(img: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        grid = torch.stack([xx / (w - 1) * 2 - 1, yy / (h - 1) * 2 - 1], -1).reshape(1, -1, size, 2)
        return F.grid_sample(img, grid, align_corners=True, padding_mode="zeros").reshape(yy.shape)

    tgt_ok = sample(tgt_valid.float(), py, px) > 0.999
    shift = init[0, :, cy.long()][:, :, cx.long()].permute(1, 2, 0).clone()  # (ny, nx, [x, y])
    jac = torch.zeros(ny, nx, 4)  # d(x)/dx, d(x)/dy, d(y)/dx, d(y)/dy of the displacement
    prior = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0]) * ridge * sigma**2
    weight = window
    for blur in levels:
        s, t = normalised(src, src_valid, blur), normalised(tgt, tgt_valid, blur)
        sx, sy = gradients(s)
        t_patch = sample(t, py, px)
        for _ in range(iterations):
            qx = px + shift[..., 0, None, None] + jac[..., 0, None, None] * ox + jac[..., 1, None, None] * oy
            qy = py + shift[..., 1, None, None] + jac[..., 2, None, None] * ox + jac[..., 3, None, None] * oy
            weight = window * ((sample(src_valid.float(), qy, qx) > 0.999) & tgt_ok & inside).float()
            gx, gy = sample(sx, qy, qx), sample(sy, qy, qx)
            residual = sample(s, qy, qx) - t_patch
            basis = [gx, gy, gx * ox, gx * oy, gy * ox, gy * oy]
            weighted = [weight * b for b in basis]
            normal = torch.empty(ny, nx, 6, 6)
            for i in range(6):
                for j in range(i, 6):
                    normal[..., i, j] = normal[..., j, i] = (weighted[i] * basis[j]).sum((-2, -1))
            rhs = torch.stack([(b * residual).sum((-2, -1)) for b in weighted], -1)
            mass = weight.sum((-2, -1))[..., None]
            normal = normal + torch.diag_embed(prior * mass + 1e-6)  # damps the Jacobian's steps
            delta = -torch.linalg.solve(normal, rhs[..., None])[..., 0]
            shift = shift + delta[..., :2].clamp(-2, 2)
            jac = (jac + delta[..., 2:]).clamp(-max_jacobian, max_jacobian)

    cover = weight.sum((-2, -1)) / window.sum((-2, -1))
    usable = (cover >= min_cover) & torch.isfinite(shift).all(-1)
    grid = shift.permute(2, 0, 1)[None]
    around = torch.where(usable[None, None], grid, torch.full_like(grid, float("nan")))
    around = F.unfold(F.pad(around, (2, 2, 2, 2), value=float("nan")).reshape(2, 1, ny + 4, nx + 4), 5)
    median = torch.nanmedian(around.reshape(2, 25, ny * nx), dim=1).values.reshape(2, ny, nx)
    deviation = torch.nan_to_num((grid[0] - median).norm(dim=0), nan=0.0)
    strength = usable.float() * cover / (1.0 + (deviation / soft) ** 2)  # (ny, nx)

    # dense: sum_k strength_k g_k(y) g_k(x) (a_k + b_k x + c_k y) / sum_k strength_k g_k(y) g_k(x), separable
    rows = torch.exp(-0.5 * ((torch.arange(h, dtype=torch.float32)[:, None] - cy[None]) / stride) ** 2)  # (h, ny)
    cols = torch.exp(-0.5 * ((cx[:, None] - torch.arange(w, dtype=torch.float32)[None]) / stride) ** 2)  # (nx, w)
    xs = torch.arange(w, dtype=torch.float32)[None]
    ys = torch.arange(h, dtype=torch.float32)[:, None]

    def blend(values: torch.Tensor) -> torch.Tensor:
        return rows @ (strength * values) @ cols

    den = blend(torch.ones(ny, nx)).clamp_min(1e-12)
    out = []
    for axis in range(2):
        gain_x, gain_y = jac[..., 2 * axis], jac[..., 2 * axis + 1]
        const = shift[..., axis] - gain_x * cx[None, :] - gain_y * cy[:, None]
        out.append((blend(const) + xs * blend(gain_x) + ys * blend(gain_y)) / den)
    return torch.stack(out)[None]
