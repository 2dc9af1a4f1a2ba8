"""How far a final field moves its section as a whole: the rigid part of the field, reported per section.

A serial aligner follows the content from section to section, so over a long stack it can turn and
shift sections away from the geometry they were imaged in, smoothly, without any one pair looking
misaligned (the 30 published ISBI sections turn by about 0.7 degrees a section: docs/estimators.md).
The compose step fits the rigid map (rotation and translation) closest, in least squares, to the
section's final map p -> p + f(p) and reports its angle and the shift of the section's centre, plus
the RMS of what is left (the field's non-rigid part). The fit needs only sums over pixels, so it adds
up chunk by chunk to exactly the fit over the whole section.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where fields are counted: `seamless report` reads the figures without it
    import torch

#: The sums the fit needs, in this order: n, Σp_x, Σp_y, Σq_x, Σq_y, Σp·q, Σp×q, Σ|p|², Σ|q|².
_MOMENTS = 9


@dataclass
class DriftTally:
    """Moments of (p, q = p + f(p)) over the chunks of one section, p relative to `centre` (x, y) in the
    field's pixels; `scale` converts those pixels to MIP-0 pixels for the report."""

    centre: tuple[float, float]
    scale: float = 1.0
    sums: list[float] = field(default_factory=lambda: [0.0] * _MOMENTS)

    def add(self, displacement: torch.Tensor, origin: tuple[int, int]) -> None:
        """Add one chunk's (1, 2, H, W) field whose pixel (0, 0) is at `origin` (x, y) in the section.

        p_x depends on the column only and p_y on the row only, so every sum reduces to the field's row
        and column sums and the coordinate vectors: a few passes over the chunk."""
        import torch

        d = displacement[0]
        h, w = d.shape[-2:]
        f64 = torch.float64
        px = torch.arange(w, dtype=f64, device=d.device) + (origin[0] - self.centre[0])  # (w,)
        py = torch.arange(h, dtype=f64, device=d.device) + (origin[1] - self.centre[1])  # (h,)
        # the reductions in the field's own float32 (pairwise summation: ~1e-7 relative), the rest in float64
        columns = d.sum(dim=1).to(f64)  # (2, w): each column's sum of d_x and d_y
        rows = d.sum(dim=2).to(f64)  # (2, h)
        sum_d = columns.sum(dim=1)
        sum_p = (h * px.sum(), w * py.sum())
        sum_pp = h * (px * px).sum() + w * (py * py).sum()
        p_dot_d = (px * columns[0]).sum() + (py * rows[1]).sum()  # Σ p_x d_x + p_y d_y
        p_cross_d = (px * columns[1]).sum() - (py * rows[0]).sum()  # Σ p_x d_y - p_y d_x
        flat = d.reshape(-1)
        sum_dd = torch.dot(flat, flat).to(f64)
        moments = (h * w, sum_p[0], sum_p[1], sum_p[0] + sum_d[0], sum_p[1] + sum_d[1], sum_pp + p_dot_d,
                   p_cross_d, sum_pp, sum_pp + 2 * p_dot_d + sum_dd)
        for index, value in enumerate(moments):
            self.sums[index] += float(value)

    def fit(self) -> tuple[float, float, float, float] | None:
        """(angle in radians, shift x, shift y, RMS of the rest), in the field's pixels; None if empty or
        if the field had a non-finite value (no figure rather than a NaN in the report)."""
        n, spx, spy, sqx, sqy, sdot, scross, spp, sqq = self.sums
        if n <= 0 or not all(math.isfinite(v) for v in self.sums):
            return None
        mpx, mpy, mqx, mqy = spx / n, spy / n, sqx / n, sqy / n
        dot = sdot - n * (mpx * mqx + mpy * mqy)  # Σ a·b over the centred a = p - mean p, b = q - mean q
        cross = scross - n * (mpx * mqy - mpy * mqx)
        angle = math.atan2(cross, dot) if (dot or cross) else 0.0
        cos, sin = math.cos(angle), math.sin(angle)
        # the rigid map p -> R (p - mean p) + mean q; the centre (p = 0) goes to R (-mean p) + mean q
        shift_x = mqx - (cos * mpx - sin * mpy)
        shift_y = mqy - (sin * mpx + cos * mpy)
        aa = spp - n * (mpx * mpx + mpy * mpy)
        bb = sqq - n * (mqx * mqx + mqy * mqy)
        rest = max(0.0, aa + bb - 2.0 * (cos * dot + sin * cross)) / n
        return angle, shift_x, shift_y, math.sqrt(rest)

    def details(self) -> dict[str, float]:
        """The report's figures, in degrees and MIP-0 pixels (empty when there is no fit)."""
        fitted = self.fit()
        if fitted is None:
            return {}
        angle, shift_x, shift_y, rest = fitted
        return {
            "drift_rotation_deg": round(math.degrees(angle), 4),
            "drift_shift_px": round(self.scale * math.hypot(shift_x, shift_y), 3),
            "drift_shift_xy_px": [round(self.scale * shift_x, 3), round(self.scale * shift_y, 3)],
            "drift_nonrigid_rms_px": round(self.scale * rest, 3),
        }
