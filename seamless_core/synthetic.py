"""Known deformations of real sections, for the demo, tests and benchmarks.

A misaligned stack built from an aligned one with known fields lets every stage be measured against
ground truth. Fields follow the project convention (pull, pixels, channel 0 = x).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_field(height: int, width: int, *, translation: tuple[float, float] = (0.0, 0.0),
                 rotation_deg: float = 0.0, center: tuple[float, float] | None = None) -> torch.Tensor:
    """Pull field of a rotation about `center` followed by a translation: out(p) = src(R(p - c) + c + t)."""
    cx, cy = center if center is not None else ((width - 1) / 2, (height - 1) / 2)
    theta = math.radians(rotation_deg)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    dx, dy = xs - cx, ys - cy
    src_x = math.cos(theta) * dx - math.sin(theta) * dy + cx + translation[0]
    src_y = math.sin(theta) * dx + math.cos(theta) * dy + cy + translation[1]
    return torch.stack([src_x - xs, src_y - ys])[None].to(torch.float32)


def smooth_random_field(height: int, width: int, *, amplitude: float, wavelength: float = 128.0,
                        seed: int = 0) -> torch.Tensor:
    """A smooth elastic field whose largest displacement is `amplitude` px (features ~`wavelength` px)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = (max(2, math.ceil(height / wavelength) + 1), max(2, math.ceil(width / wavelength) + 1))
    noise = torch.randn((1, 2, *coarse), generator=generator, dtype=torch.float64)
    field = F.interpolate(noise, size=(height, width), mode="bicubic", align_corners=True)
    peak = field.norm(dim=1).max()
    return (field * (amplitude / peak)).to(torch.float32)


def section_misalignment(height: int, width: int, *, seed: int, max_translation: float = 8.0,
                         max_rotation_deg: float = 0.5, elastic: float = 3.0,
                         translation_step: float = 0.0) -> torch.Tensor:
    """A random but reproducible misalignment of one section: translation, rotation and elastic warp.

    translation_step > 0 rounds the translation to multiples of it: with 2**mip px the shift is a whole
    number of pixels at that MIP, so an estimator there sees it without any sub-pixel interpolation."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1
    shift = [float(v) * max_translation for v in u[:2]]
    if translation_step > 0:
        shift = [round(v / translation_step) * translation_step for v in shift]
    rigid = affine_field(height, width, translation=(shift[0], shift[1]),
                         rotation_deg=float(u[2]) * max_rotation_deg)
    return rigid + smooth_random_field(height, width, amplitude=elastic, seed=seed + 1)


def crack_field(height: int, width: int, *, opening: float = 5.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A crack that opens by `opening` px along a gently curved line across the section.

    Returns (pull field, gap) in the deformed frame: tissue below the line moved `opening` px away
    along the line's normal, leaving a black gap of that width (gap is True there).
    """
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(4, generator=generator, dtype=torch.float64)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    angle = (u[0] - 0.5) * 0.6  # within about +-17 degrees of horizontal
    normal = torch.stack([-torch.sin(angle), torch.cos(angle)])  # points "down" across the line
    centre_y = height * (0.35 + 0.3 * u[1])
    wiggle = 4.0 * torch.sin(xs / width * 2 * math.pi * (1 + u[2]) + 6.28 * u[3])
    signed = (xs - width / 2) * normal[0] + (ys - centre_y) * normal[1] + wiggle  # distance below the line
    below = signed >= opening
    gap = (signed >= 0) & ~below
    field = torch.zeros((1, 2, height, width), dtype=torch.float64)
    field[0, 0][below] = -opening * float(normal[0])
    field[0, 1][below] = -opening * float(normal[1])
    return field.to(torch.float32), gap[None, None]


def debris_mask(height: int, width: int, *, radius: float = 20.0, seed: int = 0) -> torch.Tensor:
    """A dark blob of debris (an ellipse) somewhere inside the section; True where the debris is.

    radius 0 gives none (the benches switch the debris off that way)."""
    if radius <= 0:
        return torch.zeros((1, 1, height, width), dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(4, generator=generator, dtype=torch.float64)
    cx, cy = width * (0.2 + 0.6 * u[0]), height * (0.2 + 0.6 * u[1])
    ax, ay = radius * (0.7 + 0.6 * u[2]), radius * (0.7 + 0.6 * u[3])
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    return (((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1.0)[None, None]


def deformed_copy(image: torch.Tensor, *, seed: int, max_translation: float = 20.0, max_rotation_deg: float = 1.0,
                  elastic: float = 3.0, crack_opening: float = 5.0, debris_radius: float = 20.0,
                  band: int = 4, translation_step: float = 0.0) -> dict[str, torch.Tensor]:
    """A deformed copy of `image` (N=1, C=1, H, W; values in [0, 1]) with its exact alignment field.

    Returns:
      deformed: the copy (translation, rotation, elastic warp, an open crack, a black debris patch);
      truth: the pull field that aligns `deformed` back onto `image` (warp(deformed, truth) ~ image);
      tissue: original-frame pixels whose content survives in the copy (not in the gap, the debris or
        outside the section);
      crack_band: original-frame pixels within `band` px of the crack.
    """
    from . import fields  # local: synthetic data is built on the field algebra

    height, width = image.shape[-2:]
    global_field = section_misalignment(height, width, seed=seed, max_translation=max_translation,
                                        max_rotation_deg=max_rotation_deg, elastic=elastic,
                                        translation_step=translation_step)
    crack, gap = crack_field(height, width, opening=crack_opening, seed=seed + 11)
    cracked = fields.warp(image, crack).masked_fill(gap, 0.0)
    deformed = fields.warp(cracked, global_field)  # = warp(image, compose(global, crack)) off the gap
    debris = debris_mask(height, width, radius=debris_radius, seed=seed + 13)
    deformed = deformed.masked_fill(debris, 0.0)

    total = fields.compose(global_field, crack)
    truth = fields.invert(total.double(), iterations=300, tolerance=1e-6).float()
    # content that survives, seen from the original frame: sample the copy's validity through the truth field
    inside = torch.ones_like(image)
    valid_deformed = fields.warp(inside, global_field) > 0.999
    valid_deformed &= ~debris & ~fields.warp_mask(gap, global_field, rule="any")
    tissue = ~fields.warp_mask(~valid_deformed, truth, rule="any")
    residual = fields.compose(total, truth).norm(dim=1, keepdim=True)  # exact only where the inverse is
    crack_line = fields.warp_mask(gap, truth, rule="any") | (residual > 0.05)
    crack_band = F.max_pool2d(crack_line.float(), 2 * band + 1, stride=1, padding=band) > 0
    return {"deformed": deformed, "truth": truth, "tissue": tissue & ~crack_line, "crack_band": crack_band}
