"""Block matching: masked normalised cross-correlation of patches on a grid, then a dense smooth field.

For every patch of the target (a grid of `patch_size` px squares, `stride` px apart) the source,
pre-warped by the initial field, is searched within `search_radius` px for the best match. The
correlation is Padfield's *masked* NCC (IEEE TIP 2012): black (0) and defect pixels of either image are
left out of the sums, so a patch half covered by debris still matches on its tissue. All patches are
correlated at once with batched FFTs (CPU or CUDA).

Per patch the estimator keeps a quality record: the peak NCC, the ratio of the peak to the second
highest local maximum (outside `exclusion` px of the peak), the tissue fraction, and whether it was
accepted. A patch is rejected when it has too little tissue, a low or ambiguous peak, a peak on the
edge of the search window, or a vector that disagrees with the median of its accepted neighbours by
more than `max_deviation` px. Rejected patches are filled by normalised convolution from accepted ones;
the patch-grid field is interpolated bilinearly to full resolution and lightly smoothed.

All distances are in pixels of the MIP the estimator runs at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from .. import fields
from .base import Pair
from .params import EstimatorParams

__all__ = ["BlockMatching", "MatchQuality", "gaussian_blur", "masked_blur", "normalised_fill"]

#: Patches correlated at once, per device type (~1.5 MiB of FFT buffers each at the default patch 32, radius
#: 32): bounds a chunk's working memory whatever its size. On CPU small groups stay in cache: 64 patches
#: took 2.75 s and 0.5 GB RSS for a 512² pair where 1024 took 12.2 s and 1.8 GB (2 threads, measured by hand
#: on 2026-12-06; not yet a bench/ figure); a GPU wants many patches per launch.
PATCH_GROUP = {"cpu": 64}
PATCH_GROUP_DEFAULT = 1024


@dataclass
class MatchQuality:
    """Per-patch record of the last match; every map is (N, 1, ny, nx) over the patch grid.

    `displacement` (N, 2, ny, nx) is the residual vector found for each patch (on top of `init`), NaN
    where no peak was found; `centres_x` / `centres_y` are the patch centres in target pixels.
    """

    peak: Tensor
    ratio: Tensor
    tissue: Tensor
    accepted: Tensor
    displacement: Tensor
    centres_x: Tensor
    centres_y: Tensor

    @property
    def accepted_fraction(self) -> float:
        return float(self.accepted.float().mean()) if self.accepted.numel() else 0.0


# --------------------------------------------------------------------------------------------------
# small helpers shared with the finetuner
# --------------------------------------------------------------------------------------------------
def _gaussian_kernel(sigma: float, device, dtype) -> Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(t: Tensor, sigma: float) -> Tensor:
    """Separable gaussian blur of (N, C, H, W) with reflect padding (replicate where too small)."""
    if sigma <= 0:
        return t
    n, c, h, w = t.shape
    k = _gaussian_kernel(sigma, t.device, t.dtype)
    r = (k.numel() - 1) // 2
    x = t.reshape(n * c, 1, h, w)
    mode_x = "reflect" if w > r else "replicate"
    mode_y = "reflect" if h > r else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode_x), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode_y), k.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def masked_blur(img: Tensor, valid: Tensor, sigma: float) -> Tensor:
    """Gaussian blur that ignores invalid pixels (normalised convolution); invalid pixels become 0."""
    if sigma <= 0:
        return torch.where(valid, img, torch.zeros_like(img))
    v = valid.to(img.dtype)
    out = gaussian_blur(img * v, sigma) / gaussian_blur(v, sigma).clamp_min(1e-6)
    return torch.where(valid, out, torch.zeros_like(out))


def _blur_zero(t: Tensor, sigma: float) -> Tensor:
    """Separable gaussian blur with zero padding (for normalised convolution)."""
    n, c, h, w = t.shape
    k = _gaussian_kernel(sigma, t.device, t.dtype)
    r = (k.numel() - 1) // 2
    x = t.reshape(n * c, 1, h, w)
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
    return x.reshape(n, c, h, w)


def normalised_fill(values: Tensor, weights: Tensor, sigma: float, *, keep: bool = True) -> Tensor:
    """Fill values (N, C, h, w) where weights (N, 1, h, w) are 0 by normalised convolution.

    The gaussian grows (x2) until every hole is reached; an item without any weight is all zeros.
    With `keep`, pixels of positive weight keep their value; without, every pixel gets the weighted
    average (a smoothing that ignores zero-weight pixels).
    """
    weights = weights.to(values.dtype)
    values = torch.where(weights > 0, values, torch.zeros_like(values))
    out = torch.zeros_like(values)
    done = torch.zeros_like(weights, dtype=torch.bool)
    s = max(float(sigma), 0.5)
    limit = 2.0 * max(values.shape[-2:]) + 2.0
    while True:
        num = _blur_zero(values * weights, s)
        den = _blur_zero(weights, s)
        reach = den > 1e-6
        fill = num / den.clamp_min(1e-12)
        out = torch.where(reach & ~done, fill, out)
        done = done | reach
        if bool(done.all()) or s > limit:
            break
        s *= 2.0
    if keep:
        out = torch.where(weights > 0, values, out)
    return out


class BlockMatchingParams(EstimatorParams):
    """Block matching's parameters, in pixels at the stage's MIP (see BlockMatching)."""

    patch_size: int = Field(32, ge=8)
    stride: int = Field(8, ge=1)
    search_radius: int = Field(32, ge=1)
    min_tissue: float = Field(0.25, gt=0, le=1)
    min_overlap: float = Field(0.5, gt=0, le=1)
    min_peak: float = Field(0.3, ge=-1, lt=1)
    min_ratio: float = Field(1.1, ge=1)
    exclusion: int = Field(3, ge=1)
    max_deviation: float = Field(2.0, gt=0, allow_inf_nan=True)  # inf: no outlier rejection
    neighbourhood: int = Field(2, ge=1)
    fill_sigma: float = Field(1.0, gt=0)
    smooth_sigma: float = Field(2.0, ge=0)
    prefilter_sigma: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _within_the_patch_and_search(self) -> BlockMatchingParams:
        if self.stride > self.patch_size:
            raise ValueError(f"stride must be an integer between 1 and patch_size ({self.patch_size}), got {self.stride}")
        if self.exclusion > self.search_radius:
            raise ValueError(f"exclusion must be an integer between 1 and search_radius ({self.search_radius}), "
                             f"got {self.exclusion}")
        return self


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------
class BlockMatching:
    """Masked-NCC block matching on a patch grid, refining `init`; returns the total field.

    Parameters (pixels at the stage's MIP):
      patch_size: side of the square target patches (>= 8).
      stride: distance between patch centres (>= 1, <= patch_size).
      search_radius: largest residual displacement searched along x and along y (>= 1).
      min_tissue: smallest fraction of valid (tissue, non-defect) target pixels for a patch to count.
      min_overlap: smallest fraction of a patch's valid pixels that must land on valid source pixels for
        a shift to count (and never fewer than 16 pixels).
      min_peak: smallest peak NCC accepted.
      min_ratio: smallest ratio of the peak to the second local maximum accepted (>= 1).
      exclusion: radius around the peak in which no second peak is looked for.
      max_deviation: largest distance in px of a patch's vector from the median of its accepted
        neighbours (in a (2 * neighbourhood + 1)^2 window) before it is rejected as an outlier.
      neighbourhood: half-width of that window in patches (>= 1).
      fill_sigma: gaussian sigma, in patches, of the normalised convolution that fills rejected patches.
      smooth_sigma: gaussian sigma in px of the final smoothing of the dense residual (0 = none).
      prefilter_sigma: gaussian sigma in px applied to both images before matching (0 = none).
    """

    name = "block_matching"

    def __init__(self, **params: Any) -> None:
        self.params = BlockMatchingParams.checked(params)
        self.__dict__.update(self.params.model_dump())
        self.last_quality: MatchQuality | None = None

    def __repr__(self) -> str:
        return f"BlockMatching({', '.join(f'{k}={v!r}' for k, v in self.params.model_dump().items())})"

    @property
    def margin(self) -> int:
        """Source pixels beyond the init's reach that a search may look at (for choosing src windows)."""
        return self.search_radius + 1

    # ----------------------------------------------------------------------------------------------
    def __call__(self, pair: Pair, init: Tensor | None = None) -> Tensor:
        field, _ = self.match(pair, init)
        return field

    def match(self, pair: Pair, init: Tensor | None = None) -> tuple[Tensor, MatchQuality]:
        """(total field, per-patch quality); also kept in `last_quality`."""
        h, w = pair.shape
        n = max(pair.src.shape[0], pair.tgt.shape[0])
        device = pair.tgt.device
        if init is None:
            init = fields.identity(h, w, n, device=device)
        init = init.to(device=device, dtype=torch.float32)
        p, r, s = self.patch_size, self.search_radius, self.stride

        # the source pre-warped by init over the target grid extended by r px on every side
        m = r
        init_ext = F.pad(init, (m, m, m, m), mode="replicate")
        grid = fields.pixel_grid(h + 2 * m, w + 2 * m, device=device, dtype=torch.float32)
        offset = torch.tensor(
            [pair.offset[0] - m, pair.offset[1] - m], device=device, dtype=torch.float32
        ).view(1, 2, 1, 1)
        coords = grid + offset + init_ext
        src_img = torch.nan_to_num(pair.src.float(), nan=0.0, posinf=0.0, neginf=0.0)
        tgt_img = torch.nan_to_num(pair.tgt.float(), nan=0.0, posinf=0.0, neginf=0.0)
        src_valid = _src_valid(pair, coords)
        tgt_valid = pair.tgt_valid() & torch.isfinite(pair.tgt)
        if self.prefilter_sigma > 0:
            bad = ~torch.isfinite(pair.src) | (pair.src <= 0)
            if pair.src_defects is not None:
                bad = bad | (pair.src_defects > 0)
            src_img = masked_blur(src_img, ~bad, self.prefilter_sigma)
            tgt_img = masked_blur(tgt_img, tgt_valid, self.prefilter_sigma)
        moving = fields.sample(src_img, coords)
        moving = torch.where(src_valid, moving, torch.zeros_like(moving)).expand(n, -1, -1, -1)
        tgt_img = tgt_img.expand(n, -1, -1, -1)
        tgt_valid = tgt_valid.expand(n, -1, -1, -1)
        src_valid = src_valid.expand(n, -1, -1, -1)

        # the patch grid: centres spread evenly over [0, h-1] x [0, w-1]
        ty, cy, ny = _grid(h, p, s, device)
        tx, cx, nx = _grid(w, p, s, device)
        L = p + 2 * r
        # Patch rows in groups of at most PATCH_GROUP[device] patches: the float64 FFTs take ~1.4 MiB per patch at the
        # default sizes, so a 1152² chunk at once (20,736 patches) would need ~29 GB; per group the memory is
        # bounded and every patch's result is the same (patches are independent).
        rows_per_group = max(1, PATCH_GROUP.get(device.type, PATCH_GROUP_DEFAULT) // (nx * n))
        parts = []
        for first in range(0, ny, rows_per_group):
            rows = ty[first : first + rows_per_group]
            tmpl = _patches(tgt_img, rows, tx, p)  # (n, B, p, p)
            tmask = _patches(tgt_valid.float(), rows, tx, p)
            srch = _patches(moving, rows - r + m, tx - r + m, L)  # ext index of target y - r is y - r + m
            smask = _patches(src_valid.float(), rows - r + m, tx - r + m, L)
            ncc, overlap = _masked_ncc(tmpl, tmask, srch, smask, L)  # (n, B, 2r+1, 2r+1)
            del srch, smask
            # at a shift, enough of the patch's own tissue must land on valid source pixels
            needed = (self.min_overlap * tmask.sum(dim=(-2, -1))).clamp_min(16.0)
            ncc = torch.where(overlap >= needed[..., None, None], ncc, torch.full_like(ncc, -2.0))
            parts.append((tmask.mean(dim=(-2, -1)), *_peaks(ncc, self.exclusion)))
            del ncc, overlap
        tissue, peak, dy, dx, inner, ratio = (torch.cat(column, dim=1) for column in zip(*parts))
        found = (tissue >= self.min_tissue) & (peak > -1.5)
        disp = torch.stack([dx - r, dy - r], dim=2)  # (n, B, 2)
        disp = torch.where(found[..., None], disp, torch.full_like(disp, float("nan")))

        accepted = found & inner & (peak >= self.min_peak) & (ratio >= self.min_ratio)
        disp_grid = disp.permute(0, 2, 1).reshape(n, 2, ny, nx)
        acc_grid = accepted.reshape(n, 1, ny, nx)
        acc_grid = acc_grid & self._consistent(disp_grid, acc_grid)

        weights = acc_grid.float()
        residual_grid = normalised_fill(torch.nan_to_num(disp_grid), weights, self.fill_sigma)
        total = self.total_field(residual_grid, cy, cx, init)
        quality = MatchQuality(
            peak=peak.reshape(n, 1, ny, nx),
            ratio=ratio.reshape(n, 1, ny, nx),
            tissue=tissue.reshape(n, 1, ny, nx),
            accepted=acc_grid,
            displacement=disp_grid,
            centres_x=cx,
            centres_y=cy,
        )
        self.last_quality = quality
        return total, quality

    def total_field(self, residual_grid: Tensor, centres_y: Tensor, centres_x: Tensor, init: Tensor) -> Tensor:
        """The total field (N, 2, H, W) from one residual vector per patch (N, 2, ny, nx): interpolated
        between the patch centres, smoothed, composed with `init` (N or 1, 2, H, W)."""
        h, w = init.shape[-2:]
        residual = _to_dense(residual_grid, centres_y, centres_x, h, w)
        if self.smooth_sigma > 0:
            residual = gaussian_blur(residual, self.smooth_sigma)
        return fields.compose(residual, init.to(residual).expand(residual.shape[0], -1, -1, -1))

    def _consistent(self, disp: Tensor, accepted: Tensor) -> Tensor:
        """True where a patch agrees with the median of its accepted neighbours (or has < 2 of them)."""
        n, _, ny, nx = disp.shape
        k = self.neighbourhood
        size = 2 * k + 1
        vals = torch.where(accepted, disp, torch.full_like(disp, float("nan")))
        padded = F.pad(vals, (k, k, k, k), value=float("nan"))
        windows = F.unfold(padded.reshape(n * 2, 1, ny + 2 * k, nx + 2 * k), size)  # (n*2, size^2, ny*nx)
        windows = windows.reshape(n, 2, size * size, ny * nx)
        centre = (size * size) // 2
        windows = torch.cat([windows[:, :, :centre], windows[:, :, centre + 1 :]], dim=2)
        count = (~torch.isnan(windows[:, 0])).sum(dim=1)  # (n, ny*nx)
        median = torch.nanmedian(windows, dim=2).values  # (n, 2, ny*nx)
        dev = (disp.reshape(n, 2, -1) - median).norm(dim=1)
        good = (count < 2) | (dev <= self.max_deviation)
        return good.reshape(n, 1, ny, nx)


# --------------------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------------------
def _src_valid(pair: Pair, coords: Tensor) -> Tensor:
    """Source samples at coords that touch no black / defect pixel and lie inside the source window."""
    bad = ~torch.isfinite(pair.src) | (pair.src <= 0)
    if pair.src_defects is not None:
        bad = bad | (pair.src_defects > 0)
    invalid = fields.sample_mask(bad, coords, rule="any")
    hs, ws = pair.src.shape[-2:]
    x, y = coords[:, 0:1], coords[:, 1:2]
    outside = (x < 0) | (y < 0) | (x > ws - 1) | (y > hs - 1)
    return ~(invalid | outside)


def _grid(size: int, patch: int, stride: int, device) -> tuple[Tensor, Tensor, int]:
    """Top-left corners (long), float centres and count of patches along one axis of `size` px."""
    count = (size - 1) // stride + 1
    first = ((size - 1) - (count - 1) * stride) / 2.0
    centres_int = torch.tensor([round(first + i * stride) for i in range(count)], device=device)
    top = centres_int - patch // 2
    centres = top.to(torch.float32) + (patch - 1) / 2.0
    return top, centres, count


def _patches(img: Tensor, top_y: Tensor, top_x: Tensor, size: int) -> Tensor:
    """(n, ny*nx, size, size) windows of img (n, 1, H, W) at the given top-left corners, zero outside."""
    n, _, h, w = img.shape
    pad_lo_y = max(0, -int(top_y.min()))
    pad_lo_x = max(0, -int(top_x.min()))
    pad_hi_y = max(0, int(top_y.max()) + size - h)
    pad_hi_x = max(0, int(top_x.max()) + size - w)
    padded = F.pad(img, (pad_lo_x, pad_hi_x, pad_lo_y, pad_hi_y))
    ys = (top_y + pad_lo_y)[:, None] + torch.arange(size, device=img.device)[None]  # (ny, size)
    xs = (top_x + pad_lo_x)[:, None] + torch.arange(size, device=img.device)[None]  # (nx, size)
    plane = padded[:, 0]  # (n, Hp, Wp)
    rows = plane[:, ys]  # (n, ny, size, Wp)
    out = rows[:, :, :, xs]  # (n, ny, size, nx, size)
    return out.permute(0, 1, 3, 2, 4).reshape(n, -1, size, size)


def _masked_ncc(tmpl: Tensor, tmask: Tensor, srch: Tensor, smask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Masked NCC for every shift u in [0, size - p]^2; returns (ncc, overlap count), (n, B, k, k)."""
    p = tmpl.shape[-1]
    k = size - p + 1
    dtype = torch.float64 if tmpl.device.type in ("cpu", "cuda") else torch.float32
    f = tmpl.to(dtype) * tmask.to(dtype)
    mf = tmask.to(dtype)
    g = srch.to(dtype) * smask.to(dtype)
    mg = smask.to(dtype)
    # centre both (NCC is invariant to it, the subtractions below lose fewer bits)
    f = (f - (f.sum((-2, -1), keepdim=True) / mf.sum((-2, -1), keepdim=True).clamp_min(1))) * mf
    g = (g - (g.sum((-2, -1), keepdim=True) / mg.sum((-2, -1), keepdim=True).clamp_min(1))) * mg
    shape = (size, size)
    Ff = torch.fft.rfft2(torch.stack([f, mf, f * f], 0), s=shape).conj()
    Fg = torch.fft.rfft2(torch.stack([g, mg, g * g], 0), s=shape)

    def corr(a: int, b: int) -> Tensor:
        return torch.fft.irfft2(Ff[a] * Fg[b], s=shape)[..., :k, :k]

    n_ov = corr(1, 1)
    s_f = corr(0, 1)
    s_g = corr(1, 0)
    s_ff = corr(2, 1)
    s_gg = corr(1, 2)
    s_fg = corr(0, 0)
    n_safe = n_ov.clamp_min(1.0)
    num = s_fg - s_f * s_g / n_safe
    var_f = (s_ff - s_f * s_f / n_safe).clamp_min(0)
    var_g = (s_gg - s_g * s_g / n_safe).clamp_min(0)
    den = torch.sqrt(var_f * var_g)
    eps = 1e-6 * n_safe
    ncc = torch.where(den > eps * 1e-3, num / den.clamp_min(1e-30), torch.zeros_like(num))
    ncc = torch.where((var_f > 1e-9 * n_safe) & (var_g > 1e-9 * n_safe), ncc, torch.full_like(ncc, -2.0))
    return ncc.clamp(-2.0, 1.0).float(), torch.round(n_ov).float()


def _peaks(ncc: Tensor, exclusion: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Peak value, sub-pixel (y, x) of the peak, whether it is inside the window, peak ratio."""
    n, b, k, _ = ncc.shape
    flat = ncc.reshape(n, b, -1)
    peak, idx = flat.max(dim=-1)
    iy = torch.div(idx, k, rounding_mode="floor")
    ix = idx % k
    inner = (iy > 0) & (iy < k - 1) & (ix > 0) & (ix < k - 1)
    cyy = iy.clamp(1, k - 2)
    cxx = ix.clamp(1, k - 2)

    def at(y: Tensor, x: Tensor) -> Tensor:
        return torch.gather(flat, -1, (y * k + x).unsqueeze(-1)).squeeze(-1)

    c0 = at(cyy, cxx)
    up, down = at(cyy - 1, cxx), at(cyy + 1, cxx)
    left, right = at(cyy, cxx - 1), at(cyy, cxx + 1)

    def vertex(a: Tensor, c: Tensor, b2: Tensor) -> Tensor:
        denom = a - 2 * c + b2
        off = torch.where(denom < -1e-9, 0.5 * (a - b2) / denom.clamp(max=-1e-9), torch.zeros_like(c))
        return off.clamp(-0.5, 0.5)

    sub_y = torch.where(inner, iy.float() + vertex(up, c0, down), iy.float())
    sub_x = torch.where(inner, ix.float() + vertex(left, c0, right), ix.float())
    # second peak: the best local maximum outside `exclusion` px of the first
    local = ncc == F.max_pool2d(ncc.reshape(n * b, 1, k, k), 3, 1, 1).reshape(n, b, k, k)
    yy = torch.arange(k, device=ncc.device).view(1, 1, k, 1)
    xx = torch.arange(k, device=ncc.device).view(1, 1, 1, k)
    far = ((yy - iy[..., None, None]).abs() > exclusion) | ((xx - ix[..., None, None]).abs() > exclusion)
    second = torch.where(local & far, ncc, torch.full_like(ncc, -2.0)).reshape(n, b, -1).max(dim=-1).values
    ratio = torch.where(second > 1e-6, peak / second.clamp_min(1e-6), torch.full_like(peak, float("inf")))
    ratio = torch.where(peak > 0, ratio, torch.zeros_like(ratio))
    return peak, sub_y, sub_x, inner, ratio


def _to_dense(grid_field: Tensor, cy: Tensor, cx: Tensor, h: int, w: int) -> Tensor:
    """Bilinear interpolation of a patch-grid field (n, 2, ny, nx) with centres cy, cx to (n, 2, h, w)."""
    n, _, ny, nx = grid_field.shape
    device, dtype = grid_field.device, grid_field.dtype
    ys = torch.arange(h, device=device, dtype=dtype)
    xs = torch.arange(w, device=device, dtype=dtype)
    gy = (ys - cy[0]) / max(float(cy[-1] - cy[0]), 1e-6) * 2 - 1 if ny > 1 else torch.zeros_like(ys)
    gx = (xs - cx[0]) / max(float(cx[-1] - cx[0]), 1e-6) * 2 - 1 if nx > 1 else torch.zeros_like(xs)
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None].expand(n, -1, -1, -1)
    return F.grid_sample(grid_field, grid, mode="bilinear", padding_mode="border", align_corners=True)
