"""The synthetic deformations the quality benches switch apart (bench/chain_diagnosis.py --deform)."""

from __future__ import annotations

import torch

from seamless_core import synthetic


def test_translation_only_in_whole_pixels_is_an_exact_shift() -> None:
    """translation_step=4 with everything else off: the copy is the image shifted by a multiple of 4 px,
    pixel for pixel (no interpolation), and its truth field is that shift everywhere."""
    image = torch.rand(1, 1, 96, 96)
    d = synthetic.deformed_copy(image, seed=7, elastic=0.0, max_rotation_deg=0.0, crack_opening=0.0,
                                debris_radius=0.0, translation_step=4.0)
    shift = d["truth"][0, :, 48, 48]
    assert torch.allclose(d["truth"], shift[None, :, None, None].expand_as(d["truth"]), atol=1e-4)
    dx, dy = (-round(float(v)) for v in shift)  # deformed(p) = image(p + t), truth = -t
    assert dx % 4 == 0 and dy % 4 == 0 and (dx, dy) != (0, 0)
    inner = d["deformed"][..., 24:72, 24:72]
    assert torch.allclose(inner, image[..., 24 + dy : 72 + dy, 24 + dx : 72 + dx], atol=1e-4)


def test_no_debris_at_radius_zero() -> None:
    assert not synthetic.debris_mask(64, 64, radius=0.0, seed=3).any()
    assert synthetic.debris_mask(64, 64, radius=10.0, seed=3).any()
