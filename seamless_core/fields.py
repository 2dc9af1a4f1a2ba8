"""Displacement-field algebra in pure torch (CPU or CUDA; no storage, no Airflow).

Field convention (the one every layer, step and estimator of this project uses)
-------------------------------------------------------------------------------
* A **field** is a floating tensor (float32 by default) of shape ``(N, 2, H, W)``.
* Channel 0 is the displacement along **x** = CloudVolume x = the tensor's last axis ``W``;
  channel 1 is the displacement along **y** = CloudVolume y = the ``H`` axis.
* Units are **pixels of the field's own MIP** (MIP m = 2^m downsampling in x and y).
* **Pull** convention: ``out(p) = src(p + f(p))``. A zero field is the identity.
* Pixel ``p = (x, y)`` has integer coordinates at pixel centres, ``x`` in ``[0, W)``, ``y`` in ``[0, H)``.
* An **image** is a floating tensor of shape ``(N, C, H, W)``; a **mask** is ``(N, 1, H, W)``.

corgie stores channel 0 along y, and old SEAMLeSS stores MIP-0 pixels at every MIP: convert those
explicitly, never assume.

Batch broadcasting: wherever two tensors meet (image and coordinates, two fields, mask and field) a
batch of 1 broadcasts over the other's batch of N.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "identity",
    "pixel_grid",
    "sample",
    "warp",
    "warp_mask",
    "sample_mask",
    "compose",
    "invert",
    "resample",
    "smoothness",
    "jacobian_determinant",
    "max_displacement",
    "MASK_WEIGHT_EPS",
]

_SAMPLE_MODES = ("bilinear", "nearest")
_PADDINGS = ("zeros", "border")
_MASK_RULES = ("any", "nearest")

#: In ``warp_mask(rule="any")`` a neighbour counts as contributing when its 1-D bilinear weight along
#: x and along y both exceed this. It keeps float noise in a field (1e-7 px) from dilating masks by a
#: pixel; a contribution that small is invisible in the rendered image anyway.
MASK_WEIGHT_EPS = 1e-3


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
def _check_4d(name: str, t: Tensor, what: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {what}, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have shape {what}, got shape {tuple(t.shape)}")


def _check_field(name: str, field: Tensor) -> None:
    _check_4d(name, field, "(N, 2, H, W)")
    if field.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2, H, W) with 2 channels (x, y), got shape "
                         f"{tuple(field.shape)}")
    if not field.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {field.dtype}")


def _check_image(name: str, image: Tensor) -> None:
    _check_4d(name, image, "(N, C, H, W)")
    if not image.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {image.dtype}")


def _check_mask(name: str, mask: Tensor) -> None:
    _check_4d(name, mask, "(N, 1, H, W)")
    if mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (N, 1, H, W), got shape {tuple(mask.shape)}")


def _check_batch(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    na, nb = a.shape[0], b.shape[0]
    if na != nb and na != 1 and nb != 1:
        raise ValueError(f"batch sizes of {a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} "
                         f"differ and neither is 1")


def _check_same_size(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the same "
                         f"spatial size (H, W)")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


# --------------------------------------------------------------------------------------------------
# grids (cached: they are rebuilt for every chunk otherwise)
# --------------------------------------------------------------------------------------------------
def _device(device: torch.device | str | None) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def identity(height: int, width: int, batch: int = 1, *, device=None, dtype=torch.float32) -> Tensor:
    """Zero field of shape (batch, 2, height, width): the identity under the pull convention."""
    return torch.zeros((batch, 2, height, width), device=_device(device), dtype=dtype)


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)  # cached across calls: an inference tensor here would break later autograd
def _pixel_grid(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((xs, ys)).unsqueeze(0)


def pixel_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """(1, 2, H, W) absolute pixel-centre coordinates (x, y); cached, so never modify it in place."""
    return _pixel_grid(int(height), int(width), _device(device), dtype)


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)
def _norm_affine(height: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """scale, offset (each shape (2,), order x, y) with grid_norm = coords * scale + offset.

    x_norm = (2x + 1) / W - 1 maps pixel centres into grid_sample's [-1, 1] with align_corners=False.
    """
    scale = torch.tensor([2.0 / width, 2.0 / height], device=device, dtype=dtype)
    offset = torch.tensor([1.0 / width - 1.0, 1.0 / height - 1.0], device=device, dtype=dtype)
    return scale, offset


@functools.lru_cache(maxsize=8)
@torch.inference_mode(False)
def _normalised_identity(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(1, H, W, 2) identity grid already in grid_sample's normalised coordinates."""
    scale, offset = _norm_affine(height, width, device, dtype)
    return torch.addcmul(offset, _pixel_grid(height, width, device, dtype).permute(0, 2, 3, 1), scale)


# --------------------------------------------------------------------------------------------------
# sampling and warping
# --------------------------------------------------------------------------------------------------
def _compute_dtype(image: Tensor) -> torch.dtype:
    """float64 stays float64; float16/bfloat16 are sampled in float32 (coordinates need the bits)."""
    return torch.float64 if image.dtype == torch.float64 else torch.float32


def _grid_sample(image: Tensor, grid: Tensor, mode: str, padding: str) -> Tensor:
    """grid_sample with batch broadcasting; `grid` is (Ng, Ho, Wo, 2) normalised, image dtype-matched."""
    n, c, _, _ = image.shape
    ng = grid.shape[0]
    if ng == 1 and n > 1:
        # one grid for the whole batch: fold the batch into channels, one pass, no copy of the grid
        out = F.grid_sample(image.reshape(1, n * c, *image.shape[-2:]), grid, mode=mode,
                            padding_mode=padding, align_corners=False)
        return out.view(n, c, *out.shape[-2:])
    if n == 1 and ng > 1:
        image = image.expand(ng, -1, -1, -1)
    return F.grid_sample(image, grid, mode=mode, padding_mode=padding, align_corners=False)


def _sample_checked(image: Tensor, grid: Tensor, mode: str, padding: str) -> Tensor:
    work = image if image.dtype == grid.dtype else image.to(grid.dtype)
    out = _grid_sample(work, grid, mode, padding)
    return out if out.dtype == image.dtype else out.to(image.dtype)


def sample(image: Tensor, coords: Tensor, *, mode: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Sample `image` (N, C, Hi, Wi) at absolute pixel coordinates `coords` (N, 2, Ho, Wo), x then y.

    Coordinates are in the image's own pixel frame (pixel centres are integers). Out-of-range samples
    are 0 (padding "zeros") or the nearest edge value (padding "border"). Returns (N, C, Ho, Wo).
    grid_sample takes float32 coordinates normalised to [-1, 1], which limits their precision to about
    Wi * 6e-8 px (~1e-5 px at 200 px, ~1e-4 px at 2048 px): integer shifts are not bit-exact.
    """
    _check_image("image", image)
    _check_field("coords", coords)
    _check_batch("image", image, "coords", coords)
    _check_choice("mode", mode, _SAMPLE_MODES)
    _check_choice("padding", padding, _PADDINGS)
    dtype = _compute_dtype(image)
    scale, offset = _norm_affine(image.shape[-2], image.shape[-1], image.device, dtype)
    # one kernel writes a fresh (N, Ho, Wo, 2) grid: coords * scale + offset
    grid = torch.addcmul(offset, coords.permute(0, 2, 3, 1).to(dtype), scale)
    return _sample_checked(image, grid, mode, padding)


def warp(image: Tensor, field: Tensor, *, mode: str = "bilinear", padding: str = "zeros") -> Tensor:
    """Pull-warp: out(p) = image(p + field(p)); image (N, C, H, W), field (N, 2, H, W)."""
    _check_image("image", image)
    _check_field("field", field)
    _check_batch("image", image, "field", field)
    _check_same_size("image", image, "field", field)
    _check_choice("mode", mode, _SAMPLE_MODES)
    _check_choice("padding", padding, _PADDINGS)
    h, w = field.shape[-2:]
    dtype = _compute_dtype(image)
    scale, _ = _norm_affine(h, w, image.device, dtype)
    base = _normalised_identity(h, w, image.device, dtype)
    # sample(image, pixel_grid + field) fused: base_norm + field * scale, a single fresh tensor
    grid = torch.addcmul(base, field.permute(0, 2, 3, 1).to(dtype), scale)
    return _sample_checked(image, grid, mode, padding)


def _gather_padded(padded: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
    """padded (N, 1, H+2, W+2) bool with a False rim; xi, yi (N, H, W) long in unpadded coordinates."""
    hp, wp = padded.shape[-2:]
    xi = xi.clamp(-1, wp - 2) + 1  # anything outside lands on the False rim
    yi = yi.clamp(-1, hp - 2) + 1
    flat = padded.reshape(padded.shape[0], hp * wp)
    index = (yi * wp + xi).reshape(xi.shape[0], -1)
    return torch.gather(flat, 1, index).view(xi.shape)


def sample_mask(mask: Tensor, coords: Tensor, *, rule: str = "any") -> Tensor:
    """Sample a mask (N, 1, Hi, Wi; nonzero = masked) at absolute coords (N, 2, Ho, Wo) -> bool.

    The mask counterpart of `sample` (same pixel frame, same batch broadcasting); see `warp_mask` for
    the rules. Coordinates are used exactly, not through grid_sample's normalised float32 grid, so an
    integer or zero displacement never leaks a neighbour in.
    """
    _check_mask("mask", mask)
    _check_field("coords", coords)
    _check_batch("mask", mask, "coords", coords)
    _check_choice("rule", rule, _MASK_RULES)
    n = max(mask.shape[0], coords.shape[0])
    hi, wi = mask.shape[-2:]
    padded = F.pad((mask != 0).to(torch.uint8), (1, 1, 1, 1)).bool().expand(n, -1, -1, -1)
    finite = torch.isfinite(coords).all(dim=1).expand(n, -1, -1)
    # clamping to just outside the mask keeps .long() defined and changes no result
    qx = torch.nan_to_num(coords[:, 0], nan=0.0).clamp(-2.0, wi + 1.0).expand(n, -1, -1)
    qy = torch.nan_to_num(coords[:, 1], nan=0.0).clamp(-2.0, hi + 1.0).expand(n, -1, -1)
    if rule == "nearest":
        out = _gather_padded(padded, torch.floor(qx + 0.5).long(), torch.floor(qy + 0.5).long())
    else:
        x0, y0 = torch.floor(qx), torch.floor(qy)
        fx, fy = qx - x0, qy - y0
        x0, y0 = x0.long(), y0.long()
        use_x0, use_x1 = fx < 1 - MASK_WEIGHT_EPS, fx > MASK_WEIGHT_EPS
        use_y0, use_y1 = fy < 1 - MASK_WEIGHT_EPS, fy > MASK_WEIGHT_EPS
        out = torch.zeros_like(finite)
        for dx, ux in ((0, use_x0), (1, use_x1)):
            for dy, uy in ((0, use_y0), (1, use_y1)):
                out |= ux & uy & _gather_padded(padded, x0 + dx, y0 + dy)
    return (out | ~finite).unsqueeze(1)


def warp_mask(mask: Tensor, field: Tensor, *, rule: str = "any") -> Tensor:
    """Warp a mask (N, 1, H, W; nonzero = masked) by `field`; returns bool (N, 1, H, W).

    rule "any": p is masked if any of the (up to) 4 bilinear neighbours that contribute to the sample
    at p + f(p) is masked -- conservative, so that a warped image never shows defect pixels. A
    neighbour contributes when its bilinear weights along x and y both exceed MASK_WEIGHT_EPS.
    rule "nearest": the nearest neighbour, ties rounded up (as scipy's order 0; grid_sample's nearest
    rounds half to even, which would drop every other column under a half-pixel shift); always a
    subset of "any". Out-of-range neighbours are unmasked; pixels whose field is not finite are masked.
    """
    _check_mask("mask", mask)
    _check_field("field", field)
    _check_same_size("mask", mask, "field", field)
    coords = pixel_grid(field.shape[-2], field.shape[-1], device=field.device, dtype=field.dtype) + field
    return sample_mask(mask, coords, rule=rule)


# --------------------------------------------------------------------------------------------------
# algebra
# --------------------------------------------------------------------------------------------------
def compose(f: Tensor, g: Tensor) -> Tensor:
    """h with warp(I, h) == warp(warp(I, g), f): h(p) = f(p) + g(p + f(p)).

    g is sampled with "border" padding, so g's edge values extend outward instead of decaying to 0.
    """
    _check_field("f", f)
    _check_field("g", g)
    _check_batch("f", f, "g", g)
    _check_same_size("f", f, "g", g)
    return f + warp(g, f, padding="border")


def invert(f: Tensor, *, iterations: int = 100, tolerance: float = 1e-3) -> Tensor:
    """g with compose(g, f) ~ 0, i.e. warping by f and then by g is the identity.

    Solves the fixed point g(p) = -f(p + g(p)) by iteration from g = -f, stopping once the largest
    change is below `tolerance` px. The iteration is a contraction, and the inverse exists, where the
    field's Jacobian has norm |grad f| < 1 (no folds); smooth fields of 20+ px with |grad f| <~ 0.5
    converge in ~15 iterations to residuals of a few 1e-3 px away from the border. Near the border
    p + g(p) can leave the field and f is extended with its edge values, so the inverse is only an
    estimate within max|f| px of the edge. Warns (RuntimeWarning) if it has not converged.
    """
    _check_field("f", f)
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    g = -f
    for _ in range(iterations):
        g_next = -warp(f, g, padding="border")
        change = (g_next - g).abs().amax().item() if g.numel() else 0.0
        g = g_next
        if change < tolerance:
            return g
    warnings.warn(f"invert: no convergence after {iterations} iterations (last change {change:.3g} px "
                  f"> tolerance {tolerance}); is |grad f| < 1?", RuntimeWarning, stacklevel=2)
    return g


def resample(field: Tensor, src_mip: int, dst_mip: int) -> Tensor:
    """Move a field from MIP `src_mip` to MIP `dst_mip`, converting both size and units.

    Spatial size and values scale by 2^(src - dst). Going coarser averages 2^k x 2^k blocks (partial
    blocks at odd edges average only their real pixels); going finer interpolates bilinearly with
    align_corners=False, because pixel i at MIP m+1 covers pixels 2i, 2i+1 at MIP m (centre 2i + 0.5).
    """
    _check_field("field", field)
    for name, mip in (("src_mip", src_mip), ("dst_mip", dst_mip)):
        if int(mip) != mip or mip < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {mip!r}")
    k = int(src_mip) - int(dst_mip)
    if k == 0:
        return field
    factor = 2 ** abs(k)
    if k < 0:
        pooled = F.avg_pool2d(field, kernel_size=factor, stride=factor, ceil_mode=True,
                              count_include_pad=False)
        return pooled / factor
    h, w = field.shape[-2:]
    up = F.interpolate(field, size=(h * factor, w * factor), mode="bilinear", align_corners=False)
    return up * factor


# --------------------------------------------------------------------------------------------------
# diagnostics and losses
# --------------------------------------------------------------------------------------------------
def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    if weights is None:
        return values.mean() if values.numel() else values.sum()
    weights = weights.to(values.dtype)
    total = torch.broadcast_to(weights, values.shape).sum()
    return (values * weights).sum() / total.clamp_min(1e-12)


def smoothness(field: Tensor, mask: Tensor | None = None) -> Tensor:
    """Membrane energy: mean over neighbour pairs of |f(p + e) - f(p)|^2, e = x and y steps, summed.

    With `mask` (N, 1, H, W), a pair counts only where the mask is nonzero at both pixels (weight = the
    product of the two mask values, so soft masks weight the loss). Differentiable; a finetuner loss.
    """
    _check_field("field", field)
    dx2 = (field[..., :, 1:] - field[..., :, :-1]).square().sum(dim=1, keepdim=True)
    dy2 = (field[..., 1:, :] - field[..., :-1, :]).square().sum(dim=1, keepdim=True)
    if mask is None:
        return _weighted_mean(dx2, None) + _weighted_mean(dy2, None)
    _check_mask("mask", mask)
    _check_batch("field", field, "mask", mask)
    _check_same_size("field", field, "mask", mask)
    m = mask.to(field.dtype)
    wx = m[..., :, 1:] * m[..., :, :-1]
    wy = m[..., 1:, :] * m[..., :-1, :]
    return _weighted_mean(dx2, wx) + _weighted_mean(dy2, wy)


def _derivative(t: Tensor, dim: int) -> Tensor:
    """Central differences (one-sided at the edges); zero along an axis of length 1."""
    if t.shape[dim] < 2:
        return torch.zeros_like(t)
    return torch.gradient(t, dim=dim)[0]


def jacobian_determinant(field: Tensor) -> Tensor:
    """(N, 1, H, W) determinant of d(p + f(p))/dp; 1 for translations, <= 0 where the field folds."""
    _check_field("field", field)
    dfx_dx, dfy_dx = _derivative(field, 3).unbind(1)
    dfx_dy, dfy_dy = _derivative(field, 2).unbind(1)
    det = (1 + dfx_dx) * (1 + dfy_dy) - dfx_dy * dfy_dx
    return det.unsqueeze(1)


def max_displacement(field: Tensor) -> float:
    """Largest displacement norm in px over pixels whose displacement is finite (0.0 if none)."""
    _check_field("field", field)
    norm = torch.linalg.vector_norm(field, dim=1)
    finite = norm[torch.isfinite(norm)]
    return float(finite.max()) if finite.numel() else 0.0
