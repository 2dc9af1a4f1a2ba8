"""Tests for seamless_core.fields: references are scipy/numpy in float64, never hard-coded outputs.

Every accuracy test prints what it measured (run with `-s` to see it) so regressions are visible.
Images are deliberately non-square (H != W) so that an x/y swap cannot pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from seamless_core import fields

H, W = 160, 192


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def smooth_field(h: int, w: int, amplitude: float, sigma: float, seed: int,
                 translation: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """(1, 2, h, w) float32: gaussian-filtered noise scaled to max norm `amplitude`, plus a translation."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((2, h, w))
    smooth = np.stack([ndimage.gaussian_filter(c, sigma, mode="reflect") for c in noise])
    smooth *= amplitude / np.sqrt((smooth ** 2).sum(0)).max()
    smooth[0] += translation[0]
    smooth[1] += translation[1]
    return torch.from_numpy(smooth[None]).float()


def smooth_image(h: int, w: int, sigma: float, seed: int, channels: int = 1) -> torch.Tensor:
    """(1, C, h, w) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    img = np.stack([ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma) for _ in range(channels)])
    img = (img - img.min()) / (img.max() - img.min())
    return torch.from_numpy(img[None]).float()


def constant_field(h: int, w: int, dx: float, dy: float, batch: int = 1) -> torch.Tensor:
    f = torch.empty((batch, 2, h, w))
    f[:, 0] = dx
    f[:, 1] = dy
    return f


def interior(t: torch.Tensor | np.ndarray, margin: int):
    return t[..., margin:t.shape[-2] - margin, margin:t.shape[-1] - margin]


def margin_for(*fs: torch.Tensor, extra: int = 2) -> int:
    return int(math.ceil(sum(fields.max_displacement(f) for f in fs))) + extra


def absolute_coords(field: torch.Tensor) -> np.ndarray:
    """(2, h, w) float64 sampling positions (x, y) of p + f(p) for the first batch element."""
    f = field[0].double().numpy()
    ys, xs = np.mgrid[0:f.shape[1], 0:f.shape[2]].astype(np.float64)
    return np.stack([xs + f[0], ys + f[1]])


def max_second_difference(a: np.ndarray) -> float:
    """max |a_xx| + max |a_yy| over the last two axes (discrete, unit spacing)."""
    axx = np.abs(a[..., :, 2:] - 2 * a[..., :, 1:-1] + a[..., :, :-2]).max()
    ayy = np.abs(a[..., 2:, :] - 2 * a[..., 1:-1, :] + a[..., :-2, :]).max()
    return float(axx + ayy)


def max_gradient_norm(field: torch.Tensor) -> float:
    """Largest spectral norm of grad f (central differences): the contraction factor of invert."""
    f = field[0].double().numpy()
    gy, gx = np.gradient(f, axis=(1, 2))  # each (2, h, w)
    jac = np.stack([np.stack([gx[0], gy[0]], -1), np.stack([gx[1], gy[1]], -1)], -2)  # (h, w, 2, 2)
    return float(np.linalg.norm(jac, ord=2, axis=(-2, -1)).max())


# --------------------------------------------------------------------------------------------------
# grids
# --------------------------------------------------------------------------------------------------
def test_identity_and_pixel_grid():
    ident = fields.identity(5, 7, 3)
    assert ident.shape == (3, 2, 5, 7) and ident.dtype == torch.float32 and not ident.any()
    grid = fields.pixel_grid(5, 7)
    assert grid.shape == (1, 2, 5, 7)
    ys, xs = np.mgrid[0:5, 0:7]
    np.testing.assert_array_equal(grid[0, 0].numpy(), xs)
    np.testing.assert_array_equal(grid[0, 1].numpy(), ys)
    assert fields.pixel_grid(5, 7) is grid, "pixel_grid must be cached"
    assert fields.pixel_grid(5, 7, dtype=torch.float64).dtype == torch.float64


# --------------------------------------------------------------------------------------------------
# warp / sample against scipy
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amplitude", [3.0, 10.0, 20.0])
@pytest.mark.parametrize("padding,scipy_mode", [("zeros", "grid-constant"), ("border", "nearest")])
def test_warp_bilinear_matches_scipy(amplitude, padding, scipy_mode):
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.random((2, 3, H, W))).float()  # rough image: the hardest case
    field = smooth_field(H, W, amplitude, sigma=12, seed=int(amplitude), translation=(2.5, -1.5))
    out = fields.warp(image, field, padding=padding)  # field batch 1 broadcasts over 2 images
    assert out.shape == image.shape and out.dtype == torch.float32
    coords = absolute_coords(field)
    err = 0.0
    for n in range(2):
        for c in range(3):
            ref = ndimage.map_coordinates(image[n, c].double().numpy(), coords[::-1], order=1,
                                          mode=scipy_mode, cval=0.0)
            err = max(err, float(np.abs(out[n, c].double().numpy() - ref).max()))
    print(f"warp bilinear vs scipy, amplitude {amplitude} px, padding {padding}: max abs err {err:.2e}")
    assert err < 1e-3


def test_warp_nearest_matches_scipy_away_from_ties():
    rng = np.random.default_rng(2)
    image = torch.from_numpy(rng.random((1, 1, H, W))).float()
    field = smooth_field(H, W, 15.0, sigma=10, seed=3)
    out = fields.warp(image, field, mode="nearest")[0, 0].numpy()
    coords = absolute_coords(field)
    ref = ndimage.map_coordinates(image[0, 0].double().numpy(), coords[::-1], order=0,
                                  mode="grid-constant", cval=0.0)
    frac = coords - np.floor(coords)
    away = (np.abs(frac - 0.5) > 1e-3).all(0)
    mismatches = int((out[away] != ref[away].astype(np.float32)).sum())
    print(f"warp nearest vs scipy order 0: {mismatches} mismatches over {int(away.sum())} px away from ties")
    assert away.mean() > 0.99
    assert mismatches == 0


def test_sample_matches_warp_and_broadcasts():
    image = smooth_image(H, W, 3, seed=4, channels=2).repeat(3, 1, 1, 1)
    image[1] *= 0.5
    field = smooth_field(H, W, 6.0, 10, seed=5)
    coords = fields.pixel_grid(H, W) + field
    a = fields.sample(image, coords)
    b = fields.warp(image, field)
    err = float((a - b).abs().max())
    print(f"sample(pixel_grid + f) vs warp: max abs diff {err:.2e}")
    assert err < 1e-4  # two float32 normalisation paths: ~1e-5 px apart on a 192 px wide grid
    # image batch 1 with a coordinate batch of 3 broadcasts the other way
    fields3 = torch.cat([field, -field, 2 * field])
    out = fields.warp(image[:1], fields3)
    for i in range(3):
        torch.testing.assert_close(out[i:i + 1], fields.warp(image[:1], fields3[i:i + 1]))
    # sampling into a differently sized image uses that image's own pixel frame
    big = smooth_image(2 * H, 2 * W, 6, seed=6)
    pts = fields.pixel_grid(H, W) * 2 + 0.5
    got = fields.sample(big, pts)[0, 0].double().numpy()
    ref = ndimage.map_coordinates(big[0, 0].double().numpy(), pts[0].double().numpy()[::-1], order=1)
    assert np.abs(got - ref).max() < 1e-4


def test_warp_dtypes_and_gradients():
    image = smooth_image(32, 40, 2, seed=7)
    field = smooth_field(32, 40, 3.0, 6, seed=8)
    out64 = fields.warp(image.double(), field)
    assert out64.dtype == torch.float64
    out16 = fields.warp(image.bfloat16(), field)
    assert out16.dtype == torch.bfloat16
    assert float((out16.float() - fields.warp(image, field)).abs().max()) < 1e-2
    field.requires_grad_(True)
    fields.warp(image, field).sum().backward()
    assert field.grad is not None and field.grad.abs().sum() > 0


def test_integer_translation_is_exact_shift():
    image = torch.rand(1, 1, 24, 30)
    out = fields.warp(image, constant_field(24, 30, 3.0, -2.0))
    # out(x, y) = image(x + 3, y - 2); not bit-exact: grid_sample's [-1, 1] round trip costs ~1e-6 px
    torch.testing.assert_close(out[0, 0, 2:, :-3], image[0, 0, :-2, 3:], rtol=0, atol=1e-5)
    assert float(out[0, 0, :2].abs().max()) < 1e-5 and float(out[0, 0, :, -3:].abs().max()) < 1e-5


# --------------------------------------------------------------------------------------------------
# compose
# --------------------------------------------------------------------------------------------------
def test_compose_matches_sequential_warps():
    image = smooth_image(H, W, 4, seed=10)
    f = smooth_field(H, W, 8.0, 16, seed=11, translation=(3.0, -4.0))
    g = smooth_field(H, W, 12.0, 20, seed=12, translation=(-5.0, 2.0))
    h = fields.compose(f, g)
    once = fields.warp(image, h)
    mid = fields.warp(image, g)
    twice = fields.warp(mid, f)
    m = margin_for(f, g)
    err = float(interior((once - twice).abs(), m).max())
    # Bound: every bilinear interpolation of a function a errs by <= (max|a_xx| + max|a_yy|) / 8.
    # once: interpolates I at a position whose g part was itself interpolated (error_g * max|grad I|);
    # twice: interpolates I, then interpolates J = I o (id + g), with J's curvature measured on `mid`.
    img = image[0, 0].double().numpy()
    e_image = max_second_difference(img) / 8
    grad_image = float(np.hypot(*np.gradient(img)).max())
    e_g = math.sqrt(2) * max_second_difference(g[0].double().numpy()) / 8
    e_mid = max_second_difference(interior(mid[0, 0].double().numpy(), m)) / 8
    bound = e_image + grad_image * e_g + e_image + e_mid
    print(f"compose vs sequential warps: interior max abs err {err:.2e} (margin {m} px), bound {bound:.2e}")
    assert bound < 0.05, "test image/fields are not smooth enough for a meaningful bound"
    assert err <= bound


def test_compose_batch_broadcast():
    f = smooth_field(40, 48, 4.0, 6, seed=13).repeat(2, 1, 1, 1)
    f[1] *= -1
    g = smooth_field(40, 48, 3.0, 6, seed=14)
    h = fields.compose(f, g)
    assert h.shape == (2, 2, 40, 48)
    torch.testing.assert_close(h[1:], fields.compose(f[1:], g))


# --------------------------------------------------------------------------------------------------
# invert
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("translation,amplitude,sigma", [
    ((0.0, 0.0), 20.0, 48.0),   # pure elastic, 20 px
    ((12.0, -9.0), 8.0, 24.0),  # ~20 px in all: translation plus elastic
    ((-3.0, 2.0), 4.0, 10.0),   # short-wavelength distortion
])
def test_invert_is_left_and_right_inverse(translation, amplitude, sigma):
    hh, ww = 192, 224
    f = smooth_field(hh, ww, amplitude, sigma, seed=20 + int(amplitude), translation=translation)
    grad = max_gradient_norm(f)
    assert grad < 1, "precondition of invert: |grad f| < 1"
    g = fields.invert(f)
    m = margin_for(f)
    left = fields.max_displacement(interior(fields.compose(g, f), m))
    right = fields.max_displacement(interior(fields.compose(f, g), m))
    print(f"invert, max|f| {fields.max_displacement(f):.1f} px, |grad f| {grad:.2f}: "
          f"|compose(g, f)| {left:.2e} px, |compose(f, g)| {right:.2e} px (margin {m} px)")
    assert left < 0.05 and right < 0.05


def test_invert_warns_without_convergence():
    f = smooth_field(32, 32, 5.0, 6, seed=30)
    with pytest.warns(RuntimeWarning, match="convergence"):
        fields.invert(f, iterations=1, tolerance=1e-9)


# --------------------------------------------------------------------------------------------------
# resample
# --------------------------------------------------------------------------------------------------
def test_resample_constant_field_units():
    f1 = constant_field(33, 40, 3.0, -1.5)
    f0 = fields.resample(f1, 1, 0)
    assert f0.shape == (1, 2, 66, 80)
    torch.testing.assert_close(f0, constant_field(66, 80, 6.0, -3.0))
    back = fields.resample(f0, 0, 1)
    assert back.shape == f1.shape
    torch.testing.assert_close(back, f1)
    assert fields.resample(f1, 1, 1) is f1
    f3 = fields.resample(f0, 0, 3)  # 66 x 80 at MIP 0 -> ceil(66/8) x ceil(80/8), partial windows
    assert f3.shape == (1, 2, 9, 10)
    torch.testing.assert_close(f3, constant_field(9, 10, 0.75, -0.375))


def test_resample_downsampling_averages_partial_windows():
    f = torch.randn(1, 2, 5, 7, dtype=torch.float64)
    got = fields.resample(f, 0, 1).numpy()[0]
    ref = np.zeros((2, 3, 4))
    for i in range(3):
        for j in range(4):
            ref[:, i, j] = f.numpy()[0, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].mean(axis=(1, 2)) / 2
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_resample_round_trips_keep_units():
    f0 = smooth_field(H, W, 10.0, 16, seed=40, translation=(4.0, -7.0))
    down_up = fields.resample(fields.resample(f0, 0, 1), 1, 0)
    err_du = float((down_up - f0).abs().max())
    f1 = smooth_field(H // 2, W // 2, 5.0, 8, seed=41, translation=(2.0, -3.5))
    up_down = fields.resample(fields.resample(f1, 1, 0), 0, 1)
    err_ud = float((up_down - f1).abs().max())
    # smooth fields: both errors are curvature terms, well under 0.05 px
    print(f"resample round trips: MIP0->1->0 max err {err_du:.2e} px, MIP1->0->1 max err {err_ud:.2e} px")
    assert err_du < 0.05 and err_ud < 0.05
    # the test must be able to fail: a round trip that forgot the unit scaling is far off
    assert float((fields.resample(f0, 0, 1) * 2 - fields.resample(f0, 0, 1)).abs().max()) > 1


def test_resample_commutes_with_warp_and_downsampling():
    image0 = smooth_image(2 * H, 2 * W, 6, seed=42)
    f0 = smooth_field(2 * H, 2 * W, 12.0, 32, seed=43, translation=(7.0, -5.0))

    def down(img: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(img, 2)

    a = down(fields.warp(image0, f0))
    b = fields.warp(down(image0), fields.resample(f0, 0, 1))
    m = margin_for(fields.resample(f0, 0, 1))
    err = float(interior((a - b).abs(), m).max())
    wrong = float(interior((a - fields.warp(down(image0), f0[..., ::2, ::2])).abs(), m).max())
    print(f"warp/downsample commute at MIP 1: interior max abs err {err:.2e} (margin {m} px); "
          f"with unscaled field {wrong:.2e}")
    assert err < 0.01
    assert wrong > 10 * err


# --------------------------------------------------------------------------------------------------
# warp_mask
# --------------------------------------------------------------------------------------------------
def test_warp_mask_identity_and_integer_shift():
    rng = np.random.default_rng(50)
    mask = torch.from_numpy(rng.random((1, 1, 40, 48)) < 0.1)
    for rule in ("any", "nearest"):
        torch.testing.assert_close(fields.warp_mask(mask, fields.identity(40, 48), rule=rule), mask)
        shifted = fields.warp_mask(mask, constant_field(40, 48, -2.0, 3.0), rule=rule)
        # out(x, y) = mask(x - 2, y + 3)
        torch.testing.assert_close(shifted[0, 0, :-3, 2:], mask[0, 0, 3:, :-2])
        assert not shifted[0, 0, -3:].any() and not shifted[0, 0, :, :2].any()


def test_warp_mask_ignores_float_noise_in_the_field():
    rng = np.random.default_rng(54)
    mask = torch.from_numpy(rng.random((1, 1, 40, 48)) < 0.1)
    noise = torch.from_numpy(rng.choice([-1e-5, 1e-5], (1, 2, 40, 48))).float()
    # a compose/resample round trip leaves ~1e-6 px noise; it must not dilate the mask by a pixel
    torch.testing.assert_close(fields.warp_mask(mask, noise, rule="any"), mask)
    shifted = noise + constant_field(40, 48, 1.0, 0.0)
    torch.testing.assert_close(fields.warp_mask(mask, shifted, rule="any")[..., :, :-1], mask[..., :, 1:])


def test_warp_mask_any_contains_nearest_and_covers_bilinear_leakage():
    rng = np.random.default_rng(51)
    mask = torch.from_numpy(rng.random((2, 1, H, W)) < 0.03)
    field = smooth_field(H, W, 7.3, 9, seed=52, translation=(0.37, -0.61))
    any_ = fields.warp_mask(mask, field, rule="any")
    nearest = fields.warp_mask(mask, field, rule="nearest")
    assert any_.dtype == torch.bool and any_.shape == mask.shape
    assert not (nearest & ~any_).any(), "'nearest' must be a subset of 'any'"
    leak = fields.warp(mask.float(), field) > 1e-2  # where a rendered image would show >= 1% defect
    missed = int((leak & ~any_).sum())
    growth = float(any_.float().mean() / nearest.float().mean())
    print(f"warp_mask: any/nearest area ratio {growth:.2f}, bilinear leakage not covered by 'any': {missed}")
    assert missed == 0
    assert any_.sum() > nearest.sum()


@pytest.mark.parametrize("dx,dy", [(0.3, 0.6), (-0.45, 0.2), (0.5, -0.5), (0.0, 0.75), (-0.9, -0.1)])
def test_warp_mask_single_pixel_grows_at_most_2x2(dx, dy):
    mask = torch.zeros(1, 1, 20, 24, dtype=torch.uint8)
    mask[0, 0, 9, 11] = 1
    field = constant_field(20, 24, dx, dy)
    any_ = fields.warp_mask(mask, field, rule="any")[0, 0]
    nearest = fields.warp_mask(mask, field, rule="nearest")[0, 0]
    ys, xs = torch.nonzero(any_, as_tuple=True)
    assert 1 <= len(ys) <= 4
    assert int(ys.max() - ys.min()) <= 1 and int(xs.max() - xs.min()) <= 1
    # every masked output pixel really samples near the masked pixel: |p + d - (11, 9)| < 1 per axis
    assert bool(((xs + dx - 11).abs() < 1).all() and ((ys + dy - 9).abs() < 1).all())
    assert int(nearest.sum()) == 1 and bool(any_[nearest].all())
    expected = (2 if dx % 1 else 1) * (2 if dy % 1 else 1)
    assert len(ys) == expected


def test_sample_mask_in_a_larger_window_matches_warp_mask():
    rng = np.random.default_rng(55)
    big = torch.from_numpy(rng.random((1, 1, 60, 70)) < 0.1)
    field = smooth_field(40, 48, 3.5, 6, seed=56)
    coords = fields.pixel_grid(40, 48) + torch.tensor([11.0, 9.0]).view(1, 2, 1, 1) + field
    got = fields.sample_mask(big, coords)
    ref = fields.warp_mask(big[..., 9:49, 11:59], field)
    m = margin_for(field)
    assert torch.equal(interior(got, m), interior(ref, m))
    far = torch.full((1, 2, 4, 4), 1e30)
    assert not fields.sample_mask(big, far).any() and not fields.sample_mask(big, -far).any()


def test_warp_mask_dtypes_and_non_finite_field():
    rng = np.random.default_rng(53)
    mask = rng.random((1, 1, 16, 18)) < 0.2
    field = smooth_field(16, 18, 2.5, 4, seed=54)
    ref = fields.warp_mask(torch.from_numpy(mask), field)
    for m in (torch.from_numpy(mask.astype(np.uint8)), torch.from_numpy(mask.astype(np.float32))):
        torch.testing.assert_close(fields.warp_mask(m, field), ref)
    field[0, 0, 3, 4] = float("nan")
    assert fields.warp_mask(torch.zeros(1, 1, 16, 18), field)[0, 0, 3, 4]


# --------------------------------------------------------------------------------------------------
# smoothness, jacobian, max displacement
# --------------------------------------------------------------------------------------------------
def test_smoothness():
    assert float(fields.smoothness(constant_field(12, 14, 3.0, -2.0))) == 0.0
    f = torch.randn(2, 2, 12, 14, dtype=torch.float64, requires_grad=True)
    loss = fields.smoothness(f)
    a = f.detach().numpy()
    ref = ((np.diff(a, axis=3) ** 2).sum(1).mean() + (np.diff(a, axis=2) ** 2).sum(1).mean())
    assert float(loss.detach()) > 0
    np.testing.assert_allclose(float(loss.detach()), ref, rtol=1e-12)
    loss.backward()
    assert f.grad is not None and torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_smoothness_mask():
    f = torch.randn(1, 2, 12, 14, requires_grad=True)
    mask = torch.zeros(1, 1, 12, 14, dtype=torch.bool)
    zero = fields.smoothness(f, mask)
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert torch.isfinite(f.grad).all() and not f.grad.any()
    # a field that is rough only outside the mask has zero masked energy
    g = constant_field(12, 14, 1.0, 2.0)
    g[..., :, 7:] += torch.randn(1, 2, 12, 7)
    mask[..., :, :7] = True
    assert float(fields.smoothness(g, mask)) == 0.0
    assert float(fields.smoothness(g, ~mask)) > 0.0
    assert float(fields.smoothness(g, torch.ones(1, 1, 12, 14))) == pytest.approx(float(fields.smoothness(g)))
    # random mask against numpy: a pair counts only if both of its pixels are in the mask
    rng = np.random.default_rng(62)
    a = rng.standard_normal((1, 2, 12, 14))
    m = (rng.random((1, 1, 12, 14)) < 0.6).astype(np.float64)
    wx, wy = m[..., :, 1:] * m[..., :, :-1], m[..., 1:, :] * m[..., :-1, :]
    dx2 = (np.diff(a, axis=3) ** 2).sum(1, keepdims=True)
    dy2 = (np.diff(a, axis=2) ** 2).sum(1, keepdims=True)
    ref = (dx2 * wx).sum() / wx.sum() + (dy2 * wy).sum() / wy.sum()
    got = fields.smoothness(torch.from_numpy(a), torch.from_numpy(m > 0))
    np.testing.assert_allclose(float(got), ref, rtol=1e-12)


def test_jacobian_determinant():
    ones = torch.ones(1, 1, 10, 12)
    torch.testing.assert_close(fields.jacobian_determinant(fields.identity(10, 12)), ones)
    torch.testing.assert_close(fields.jacobian_determinant(constant_field(10, 12, 4.5, -7.0)), ones)
    # linear fields f(p) = A p: det(I + A) everywhere (central differences are exact for them)
    rng = np.random.default_rng(60)
    grid = fields.pixel_grid(10, 12)
    for _ in range(3):
        a = rng.uniform(-0.8, 0.8, (2, 2))
        f = torch.einsum("ij,njhw->nihw", torch.tensor(a, dtype=torch.float32), grid)
        det = fields.jacobian_determinant(f)
        torch.testing.assert_close(det, ones * float(np.linalg.det(np.eye(2) + a)), rtol=1e-5, atol=1e-5)
    fold = torch.zeros(1, 2, 10, 12)
    fold[:, 0] = -2 * grid[:, 0]  # x -> -x: the section is flipped, i.e. folded
    assert (fields.jacobian_determinant(fold) < 0).all()


def test_max_displacement():
    rng = np.random.default_rng(61)
    a = rng.standard_normal((2, 2, 9, 11)).astype(np.float32)
    a[1, 0, 3, 3] = np.nan
    a[0, 1, 2, 2] = np.inf
    norms = np.hypot(a[:, 0], a[:, 1])
    expected = float(norms[np.isfinite(norms)].max())
    assert fields.max_displacement(torch.from_numpy(a)) == pytest.approx(expected)
    assert fields.max_displacement(torch.full((1, 2, 3, 3), float("nan"))) == 0.0


# --------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------
sizes = st.integers(min_value=1, max_value=24)


@settings(max_examples=40, deadline=None)
@given(h=sizes, w=sizes, seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 6.0))
def test_property_compose_with_identity(h, w, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(1, 2, h, w, generator=gen) * scale
    ident = fields.identity(h, w)
    assert torch.equal(fields.compose(f, ident), f)
    torch.testing.assert_close(fields.compose(ident, f), f, rtol=0, atol=1e-4 * (1 + scale))


translations = st.floats(-40.0, 40.0, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(h=sizes, w=sizes, ax=translations, ay=translations, bx=translations, by=translations)
def test_property_translations_compose_additively(h, w, ax, ay, bx, by):
    a, b = constant_field(h, w, ax, ay), constant_field(h, w, bx, by)
    tol = 1e-5 * (1 + abs(ax) + abs(ay) + abs(bx) + abs(by))
    torch.testing.assert_close(fields.compose(a, b), constant_field(h, w, ax + bx, ay + by), rtol=0, atol=tol)
    torch.testing.assert_close(fields.invert(a), -a, rtol=0, atol=tol)


@settings(max_examples=30, deadline=None)
@given(h=sizes, w=sizes, src=st.integers(0, 3), dst=st.integers(0, 3), c=st.floats(-50, 50))
def test_property_resample_constant(h, w, src, dst, c):
    out = fields.resample(constant_field(h, w, c, -c), src, dst)
    k = src - dst
    expected_size = (h * 2**k, w * 2**k) if k >= 0 else (-(-h // 2**-k), -(-w // 2**-k))
    assert out.shape[-2:] == expected_size
    torch.testing.assert_close(out, constant_field(*expected_size, c * 2.0**k, -c * 2.0**k),
                               rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------
F2 = torch.zeros(1, 2, 8, 8)
IMG = torch.zeros(1, 1, 8, 8)


@pytest.mark.parametrize("call,match", [
    (lambda: fields.warp(IMG, torch.zeros(1, 3, 8, 8)), r"\(1, 3, 8, 8\)"),
    (lambda: fields.warp(IMG, torch.zeros(2, 8, 8)), r"\(2, 8, 8\)"),
    (lambda: fields.warp(torch.zeros(8, 8), F2), r"\(8, 8\)"),
    (lambda: fields.warp(IMG, torch.zeros(1, 2, 8, 9)), "same spatial size"),
    (lambda: fields.warp(torch.zeros(2, 1, 8, 8), torch.zeros(3, 2, 8, 8)), "batch"),
    (lambda: fields.warp(IMG.to(torch.uint8), F2), "floating"),
    (lambda: fields.warp(IMG, F2, mode="bicubic"), "mode"),
    (lambda: fields.warp(IMG, F2, padding="reflection"), "padding"),
    (lambda: fields.sample(IMG, torch.zeros(1, 1, 4, 4)), r"\(1, 1, 4, 4\)"),
    (lambda: fields.warp_mask(torch.zeros(1, 2, 8, 8), F2), r"\(1, 2, 8, 8\)"),
    (lambda: fields.warp_mask(torch.zeros(1, 1, 8, 8), F2, rule="all"), "rule"),
    (lambda: fields.compose(F2, torch.zeros(1, 2, 4, 8)), "same spatial size"),
    (lambda: fields.invert(torch.zeros(2, 8, 8)), r"\(2, 8, 8\)"),
    (lambda: fields.resample(torch.zeros(1, 1, 8, 8), 0, 1), r"\(1, 1, 8, 8\)"),
    (lambda: fields.resample(F2, -1, 0), "src_mip"),
    (lambda: fields.smoothness(F2, torch.zeros(1, 1, 8, 7)), "same spatial size"),
    (lambda: fields.jacobian_determinant(torch.zeros(1, 2, 8)), r"\(1, 2, 8\)"),
    (lambda: fields.max_displacement(torch.zeros(1, 1, 8, 8)), r"\(1, 1, 8, 8\)"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    image = smooth_image(H, W, 3, seed=70, channels=2)
    f = smooth_field(H, W, 12.0, 20, seed=71, translation=(3.0, -2.0))
    g = smooth_field(H, W, 6.0, 12, seed=72)
    mask = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(73)) < 0.05
    dev = torch.device("cuda")

    def both(fn, *args, **kw):
        cpu = fn(*args, **kw)
        gpu = fn(*(a.to(dev) if isinstance(a, torch.Tensor) else a for a in args), **kw)
        assert gpu.device.type == "cuda"
        return cpu, gpu.cpu()

    for mode in ("bilinear", "nearest"):
        cpu, gpu = both(fields.warp, image, f, mode=mode)
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4 if mode == "bilinear" else 0)
    for fn in (fields.compose,):
        cpu, gpu = both(fn, f, g)
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
    cpu, gpu = both(fields.invert, f)
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-3)
    for src, dst in ((0, 2), (2, 0)):
        cpu, gpu = both(fields.resample, f, src, dst)
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)
    cpu, gpu = both(fields.warp_mask, mask, g)
    assert torch.equal(cpu, gpu)
    cpu, gpu = both(fields.jacobian_determinant, f)
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)
    assert fields.smoothness(f.to(dev)).item() == pytest.approx(fields.smoothness(f).item(), rel=1e-5)
    assert fields.max_displacement(f.to(dev)) == pytest.approx(fields.max_displacement(f), rel=1e-6)
