"""Vector voting: a bad candidate is outvoted; agreement is reported."""

from __future__ import annotations

import pytest
import torch

from seamless_core.synthetic import affine_field, smooth_random_field
from seamless_core.vote import gaussian_blur, vector_vote


def good_candidates(n: int = 2) -> list[torch.Tensor]:
    base = affine_field(96, 96, translation=(6.0, -4.0), rotation_deg=0.5) + smooth_random_field(96, 96, amplitude=3, seed=1)
    # real candidates differ a little: each target is a different neighbour
    return [base + smooth_random_field(96, 96, amplitude=0.3, seed=10 + i) for i in range(n)]


@pytest.mark.parametrize("bad_kind", ["zero", "random", "far"])
@pytest.mark.parametrize("position", [0, 1, 2])
def test_one_bad_candidate_of_three_is_outvoted(bad_kind: str, position: int) -> None:
    good = good_candidates()
    bad = {
        "zero": torch.zeros_like(good[0]),  # a black target: the estimator returns no displacement
        "random": smooth_random_field(96, 96, amplitude=15, wavelength=20, seed=5),  # an unrelated section
        "far": good[0] + 12.0,
    }[bad_kind]
    candidates = good[:position] + [bad] + good[position:]
    voted, spread = vector_vote(torch.stack(candidates), temperature=0.5, blur_sigma=2.0)
    reference = (good[0] + good[1]) / 2
    deviation = (voted - reference).norm(dim=1)
    assert deviation.median() <= 0.5
    assert deviation.quantile(0.95) <= 1.0
    plain_mean = torch.stack(candidates).mean(0)
    assert (plain_mean - reference).norm(dim=1).median() > 2 * deviation.median()  # voting matters here
    assert spread.median() < 1.0


def test_three_agreeing_candidates_vote_to_their_mean_and_disagreement_is_visible() -> None:
    good = good_candidates(3)
    voted, spread = vector_vote(torch.stack(good), temperature=1.0)
    assert (voted - torch.stack(good).mean(0)).norm(dim=1).max() < 0.3
    scattered = torch.stack([good[0], good[0] + 10, good[0] - 10])
    scattered[2, :, 1] += 10
    _, spread_bad = vector_vote(scattered)
    assert spread_bad.min() > 5 * spread.max()


def test_five_candidates_with_two_bad() -> None:
    good = good_candidates(3)
    bad = [torch.zeros_like(good[0]), smooth_random_field(96, 96, amplitude=15, wavelength=20, seed=7)]
    voted, _ = vector_vote(torch.stack([bad[0], good[0], bad[1], good[1], good[2]]), temperature=0.5)
    assert (voted - torch.stack(good).mean(0)).norm(dim=1).median() < 0.5


def test_invalid_candidates_are_dropped_and_errors_are_clear() -> None:
    good = good_candidates(2)
    stack = torch.stack([good[0], torch.full_like(good[0], float("nan")), good[1]])
    voted, _ = vector_vote(stack, valid=torch.tensor([True, False, True]))
    assert torch.isfinite(voted).all()
    with pytest.raises(ValueError, match=r"\(K, N, 2, H, W\)"):
        vector_vote(good[0])
    with pytest.raises(ValueError, match="temperature"):
        vector_vote(stack, temperature=0)
    with pytest.raises(ValueError, match="no valid candidate"):
        vector_vote(stack, valid=torch.tensor([False, False, False]))


def test_blur_preserves_constants_and_smooths_noise() -> None:
    constant = torch.full((1, 2, 40, 40), 3.0)
    assert torch.allclose(gaussian_blur(constant, 2.0), constant, atol=1e-5)
    noise = torch.randn(1, 2, 40, 40, generator=torch.Generator().manual_seed(0))
    assert gaussian_blur(noise, 2.0).std() < 0.3 * noise.std()


def test_vote_step_through_layers_matches_in_memory_vote(tmp_path) -> None:
    """The chunked, storage-backed vote equals voting whole sections in memory (context pads the blur)."""
    import numpy as np

    from seamless_core.cli import main
    from seamless_core.geometry import BBox
    from seamless_core.volumes import LayerKind, open_layer

    from test_steps import make_layer

    good = good_candidates()
    candidates = [good[0], torch.zeros_like(good[0]), good[1]]
    paths = []
    for i, c in enumerate(candidates):
        make_layer(tmp_path / f"f{i}", c.numpy(), LayerKind.FIELD, chunk=32, max_mip=0)
        paths += ["--field", str(tmp_path / f"f{i}")]
    code = main(["vote", *paths, "--dst", str(tmp_path / "voted"), "--agreement", str(tmp_path / "agree"),
                 "--z", "0", "--chunk", "32", "--temperature", "0.5"])
    assert code == 0
    box = BBox((0, 0, 0), (96, 96, 1))
    voted = torch.from_numpy(open_layer(str(tmp_path / "voted"), LayerKind.FIELD).read(box))
    spread = open_layer(str(tmp_path / "agree"), LayerKind.QUALITY).read(box)
    whole, whole_spread = vector_vote(torch.stack(candidates), temperature=0.5, blur_sigma=2.0)
    assert (voted - whole).abs().max() < 1e-4
    assert np.abs(spread - whole_spread.numpy()).max() < 1e-4
    assert code == 0 and main(["vote", *paths[:4], "--dst", str(tmp_path / "v2"), "--agreement",
                               str(tmp_path / "a2"), "--z", "0"]) == 3  # even number of candidates
    assert not (tmp_path / "v2").exists()
