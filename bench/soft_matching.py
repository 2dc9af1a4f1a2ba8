"""Prototype, not in seamless_core: block matching whose patch weights are continuous, not accepted/rejected.

Block matching keeps or drops each patch by hard thresholds (peak, peak ratio, tissue share, deviation
from the median of its neighbours). An input that moves by a hair can flip a patch across one of them,
and the field then jumps by the patch's whole vector: a chain that aligns to rendered targets may
amplify such flips (docs/estimators.md, "Translations alone part the chains"). Here every threshold is
a ramp, the peak ratio's ramp is 0 where two peaks tie (where the arg-max flips), the neighbour check is
an iteratively reweighted mean, and a patch's own vector is blended with the fill by its weight, so the
field is a continuous function of the images almost everywhere.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from seamless_core import fields
from seamless_core.estimators import block_matching as bm
from seamless_core.estimators.base import Pair

from estimator_swap import swapped_estimators

RATIO_RAMP = 0.3  # the ratio weight rises from 0 at a tie (ratio 1) to 1 at 1 + RATIO_RAMP
PEAK_RAMP = 0.15  # the peak weight rises over min_peak -/+ PEAK_RAMP
IRLS_PASSES = 3


def ramp(x: Tensor, lo: float, hi: float) -> Tensor:
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


class SoftBlockMatching(bm.BlockMatching):
    """BlockMatching with continuous patch weights (see the module docstring)."""

    def match(self, pair: Pair, init: Tensor | None = None) -> tuple[Tensor, bm.MatchQuality]:
        _, q = super().match(pair, init)
        h, w = pair.shape
        disp = q.displacement
        n = disp.shape[0]
        if init is None:
            init = fields.identity(h, w, n, device=disp.device)
        r = float(self.search_radius)
        found = torch.isfinite(disp).all(dim=1, keepdim=True)
        inner = found & (torch.nan_to_num(disp).abs() < r - 1e-3).all(dim=1, keepdim=True)
        weight = (
            inner.float()
            * ramp(q.tissue, 0.5 * self.min_tissue, self.min_tissue)
            * ramp(q.peak, self.min_peak - PEAK_RAMP, self.min_peak + PEAK_RAMP)
            * ramp(torch.nan_to_num(q.ratio, posinf=10.0), 1.0, 1.0 + RATIO_RAMP)
        )
        values = torch.nan_to_num(disp)
        agreement = torch.ones_like(weight)
        k = self.neighbourhood
        box = torch.ones(1, 1, 2 * k + 1, 2 * k + 1, device=disp.device)
        box[..., k, k] = 0.0  # a patch is judged by its neighbours, not by itself
        for _ in range(IRLS_PASSES):
            wa = weight * agreement
            num = F.conv2d((values * wa).reshape(n * 2, 1, *values.shape[-2:]), box, padding=k).reshape_as(values)
            den = F.conv2d(wa, box, padding=k)
            reference = num / den.clamp_min(1e-6)
            deviation = (values - reference).norm(dim=1, keepdim=True)
            agreement = torch.where(den > 1e-3, 1.0 - ramp(deviation, self.max_deviation, 2 * self.max_deviation),
                                    torch.ones_like(deviation))
        weight = weight * agreement
        fill = bm.normalised_fill(values, weight, self.fill_sigma, keep=False)
        total = self.total_field(weight * values + (1 - weight) * fill, q.centres_y, q.centres_x, init)
        q.accepted = weight > 0.5
        self.last_quality = q
        return total, q


def soft_block_matching() -> contextlib.AbstractContextManager[None]:
    """Within the block, multiscale.align_pair runs every block-matching stage with soft weights."""
    return swapped_estimators(lambda estimator: SoftBlockMatching(**estimator.params.model_dump())
                              if type(estimator) is bm.BlockMatching else estimator)
