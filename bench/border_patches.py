"""Prototype, not in seamless_core: block matching that ignores the patches near the frame's border.

The two chains of the robustness test first part at the sections' edges (docs/estimators.md,
"Continuous patch weights"): there a translated section has lost a strip of content, and a patch's
match may pull from beyond the section. The target frame is the same for both runs (section 0's), so
dropping every patch whose centre lies within `border` px of it, and filling those vectors from the
interior as rejected patches are, is the same rule in both runs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from seamless_core import fields
from seamless_core.estimators import block_matching as bm
from seamless_core.estimators.base import Pair

from estimator_swap import swapped_estimators


class InteriorBlockMatching(bm.BlockMatching):
    """BlockMatching whose patches within `border` px of the target's frame are treated as rejected."""

    border = 16.0

    def match(self, pair: Pair, init: Tensor | None = None) -> tuple[Tensor, bm.MatchQuality]:
        _, q = super().match(pair, init)
        h, w = pair.shape
        n = q.displacement.shape[0]
        if init is None:
            init = fields.identity(h, w, n, device=q.displacement.device)
        b = self.border
        inside_y = (q.centres_y >= b) & (q.centres_y <= h - 1 - b)
        inside_x = (q.centres_x >= b) & (q.centres_x <= w - 1 - b)
        interior = (inside_y[:, None] & inside_x[None, :]).view(1, 1, len(q.centres_y), len(q.centres_x))
        accepted = q.accepted & interior
        residual_grid = bm.normalised_fill(torch.nan_to_num(q.displacement), accepted.float(), self.fill_sigma)
        total = self.total_field(residual_grid, q.centres_y, q.centres_x, init)
        q.accepted = accepted
        self.last_quality = q
        return total, q


def interior_block_matching(border: float) -> contextlib.AbstractContextManager[None]:
    """Within the block, multiscale.align_pair's block-matching stages ignore patches within `border` px."""
    def swap(estimator):  # noqa: ANN001, ANN202 - any estimator in, an estimator out
        if type(estimator) is not bm.BlockMatching:
            return estimator
        interior = InteriorBlockMatching(**estimator.params.model_dump())
        interior.border = border
        return interior

    return swapped_estimators(swap)
