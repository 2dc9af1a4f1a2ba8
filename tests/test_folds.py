"""The steps that write rendered fields (vector_vote, compose) count where those fields fold."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from seamless_core import fields
from seamless_core.steps.compose import ComposeParams, compose_fields, prepare_compose
from seamless_core.steps.folds import FOLD_WARNING_SHARE, FoldTally
from seamless_core.steps.vector_vote import VoteParams, prepare_vote, vote_fields
from seamless_core.synthetic import smooth_random_field
from seamless_core.volumes import LayerKind

from test_steps import make_layer

SIZE = 96


def folding_field() -> torch.Tensor:
    """A smooth field plus a band where x + f_x(x) runs backwards (d f_x / dx = -2): a fold of known extent."""
    field = smooth_random_field(SIZE, SIZE, amplitude=2.0, seed=3)
    x = torch.arange(SIZE, dtype=torch.float32)
    ramp = (-2.0 * (x - 40)).clamp(min=-2.0 * 20, max=0.0)  # falls from 0 to -40 over x = 40..60
    field[:, 0] += ramp.view(1, SIZE)
    return field


def folded_pixels(field: torch.Tensor) -> int:
    return int((fields.jacobian_determinant(field) <= 0).sum())


def test_the_test_field_folds_in_its_band_only() -> None:
    det = fields.jacobian_determinant(folding_field())[0, 0]
    assert (det[:, 42:59] <= 0).all() and (det[:, :38] > 0).all() and (det[:, 62:] > 0).all()


def write_field(path: Path, field: torch.Tensor) -> str:
    make_layer(path, field.numpy(), LayerKind.FIELD, chunk=SIZE, max_mip=0)
    return str(path)


@pytest.mark.parametrize("folding", [True, False])
def test_vote_reports_the_folded_share_of_the_voted_field(tmp_path: Path, folding: bool,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    field = folding_field() if folding else smooth_random_field(SIZE, SIZE, amplitude=2.0, seed=3)
    paths = [write_field(tmp_path / f"f{i}", field) for i in range(3)]  # three agreeing candidates vote to it
    candidates, voted, agreement, region = prepare_vote(paths, str(tmp_path / "voted"), str(tmp_path / "agree"),
                                                        None, 0, VoteParams(mip=0))
    with caplog.at_level(logging.WARNING, logger="seamless_core.steps.folds"):
        report = vote_fields(candidates, voted, agreement, region, VoteParams(mip=0))
    expected = folded_pixels(field)
    assert (expected > 0) == folding
    assert report.details["folded_pixels"] == expected
    assert report.details["folded_share"] == pytest.approx(expected / SIZE**2, abs=1e-6)
    warned = [r.getMessage() for r in caplog.records if "folds on" in r.getMessage()]
    assert bool(warned) == (expected / SIZE**2 > FOLD_WARNING_SHARE)
    if folding:
        assert "vector_vote: the voted field of z=0" in warned[0]


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_compose_reports_the_folded_share_of_the_composed_field(tmp_path: Path, weight: float) -> None:
    field = folding_field()
    path = write_field(tmp_path / "stitch", field)
    terms, dst, region = prepare_compose([(path, 0, weight)], str(tmp_path / "final"), 0, None, ComposeParams(mip=0))
    report = compose_fields(terms, dst, region, ComposeParams(mip=0))
    expected = folded_pixels(field) if weight else 0  # weight 0 composes to the identity, which never folds
    assert report.details["folded_pixels"] == expected
    assert weight == 0 or expected > 0


def test_the_tally_adds_chunks_and_says_nothing_when_empty() -> None:
    tally = FoldTally("test")
    assert tally.share == 0.0 and tally.details() == {"folded_pixels": 0, "folded_share": 0.0}
    field = folding_field()
    tally.add(field[..., :48])
    tally.add(field[..., 48:])
    assert tally.pixels == SIZE * SIZE
    # each half is differenced on its own: only the two columns at the cut may count differently
    assert abs(tally.folded - folded_pixels(field)) <= 2 * SIZE
