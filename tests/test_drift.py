"""The compose step reports how far each final field turns and shifts its section (steps/drift.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from seamless_core.steps.compose import ComposeParams, compose_fields, prepare_compose
from seamless_core.steps.drift import DriftTally
from seamless_core.synthetic import smooth_random_field
from seamless_core.volumes import LayerKind

from test_steps import make_layer

SIZE = 128


def rigid_field(degrees: float, shift: tuple[float, float], size: int = SIZE) -> torch.Tensor:
    """The pull field of p -> R (p - c) + c + shift, c the centre of a size x size section."""
    angle = math.radians(degrees)
    c = (size - 1) / 2
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                          indexing="ij")
    qx = math.cos(angle) * (x - c) - math.sin(angle) * (y - c) + c + shift[0]
    qy = math.sin(angle) * (x - c) + math.cos(angle) * (y - c) + c + shift[1]
    return torch.stack([qx - x, qy - y])[None].float()


@pytest.mark.parametrize(("degrees", "shift"), [(2.0, (5.0, -3.0)), (-0.7, (0.0, 0.0)), (0.0, (12.5, 4.0))])
def test_compose_reports_the_rigid_part_of_a_rigid_field_exactly(tmp_path: Path, degrees: float,
                                                                  shift: tuple[float, float]) -> None:
    make_layer(tmp_path / "stitch", rigid_field(degrees, shift).numpy(), LayerKind.FIELD, chunk=32, max_mip=0)
    params = ComposeParams(mip=0, chunk_xy=64)  # four chunks: the sums add up across them
    terms, dst, region = prepare_compose([(str(tmp_path / "stitch"), 0, 1.0)], str(tmp_path / "final"), 0, None, params)
    details = compose_fields(terms, dst, region, params).details
    assert details["drift_rotation_deg"] == pytest.approx(degrees, abs=1e-3)
    assert details["drift_shift_xy_px"] == pytest.approx(list(shift), abs=1e-2)
    assert details["drift_shift_px"] == pytest.approx(math.hypot(*shift), abs=1e-2)
    assert details["drift_nonrigid_rms_px"] < 1e-2


def test_the_rest_is_the_non_rigid_part_and_chunks_add_up_to_the_whole() -> None:
    bend = smooth_random_field(SIZE, SIZE, amplitude=3.0, seed=5).double()
    bend = bend - bend.mean(dim=(-2, -1), keepdim=True)
    field = rigid_field(1.5, (4.0, 2.0)).double() + bend
    centre = ((SIZE - 1) / 2, (SIZE - 1) / 2)
    whole, pieces = DriftTally(centre), DriftTally(centre)
    whole.add(field, (0, 0))
    for y in (0, 40):
        for x in (0, 70):
            pieces.add(field[..., y : y + (40 if y == 0 else SIZE - 40), x : x + (70 if x == 0 else SIZE - 70)], (x, y))
    assert pieces.fit() == pytest.approx(whole.fit(), abs=1e-9)
    angle, shift_x, shift_y, rest = whole.fit()
    # the smooth bend is not rigid: most of it is left over, and it moves the fitted rigid part only a little
    assert rest == pytest.approx(float(bend.norm(dim=1).pow(2).mean().sqrt()), rel=0.2)
    assert math.degrees(angle) == pytest.approx(1.5, abs=0.3)
    assert (shift_x, shift_y) == pytest.approx((4.0, 2.0), abs=0.3)


def test_the_report_converts_to_mip_0_pixels_and_says_nothing_when_empty_or_not_finite() -> None:
    assert DriftTally((0.0, 0.0)).details() == {}
    broken = rigid_field(1.0, (2.0, 0.0))
    broken[0, 0, 5, 7] = float("nan")
    tally = DriftTally(((SIZE - 1) / 2, (SIZE - 1) / 2))
    tally.add(broken, (0, 0))
    assert tally.fit() is None and tally.details() == {}
    tally = DriftTally(((SIZE - 1) / 2, (SIZE - 1) / 2), scale=4.0)  # a MIP-2 field: 4 MIP-0 px per px
    tally.add(rigid_field(0.0, (3.0, 4.0)), (0, 0))
    details = tally.details()
    assert details["drift_shift_px"] == pytest.approx(20.0, abs=1e-3)
    assert details["drift_shift_xy_px"] == pytest.approx([12.0, 16.0], abs=1e-3)
    assert details["drift_rotation_deg"] == pytest.approx(0.0, abs=1e-6)
