"""How much of a written field folds: a figure in the step's report and a warning in its log.

Where a field's Jacobian determinant is <= 0 the map p -> p + f(p) turns over: the render samples the
same source pixels twice there (tissue duplicated, mirrored or smeared) and drops others. Closing a
crack's gap squeezes a band to a line and counts too (0.2 % of the pixels in the workflow's exact
plumbing test); more than that is a wrong match (block matching locked onto a different structure over
a region). The steps that write the fields the images are rendered through (vector_vote, compose) count
the folded pixels of each chunk and report their share; above FOLD_WARNING_SHARE they say so in the
task log, naming the section. docs/estimators.md ("Folds") has the measured figures.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch only where fields are counted: `seamless report` reads the threshold without it
    import torch

log = logging.getLogger(__name__)

#: Share of a section's field pixels that may fold before the step warns in its log.
FOLD_WARNING_SHARE = 0.01


@dataclass
class FoldTally:
    """Folded and total pixels over the chunks of one step (chunks are counted one by one, so the
    one-sided differences at chunk borders may count a border pixel differently than a whole section).
    pipeline.run_chunks calls every chunk's compute from the step's own thread, so the counts need no lock."""

    what: str
    folded: int = 0
    pixels: int = 0

    def add(self, displacement: torch.Tensor) -> None:
        """Count one chunk's (N, 2, H, W) field."""
        from .. import fields

        self.folded += int((fields.jacobian_determinant(displacement) <= 0).sum())
        self.pixels += displacement[:, 0].numel()

    @property
    def share(self) -> float:
        return self.folded / self.pixels if self.pixels else 0.0

    def details(self) -> dict[str, float | int]:
        """The report's figures: folded pixels and their share of the field's pixels."""
        return {"folded_pixels": self.folded, "folded_share": round(self.share, 6)}

    def warn_if_folded(self, z: int) -> None:
        if self.share > FOLD_WARNING_SHARE:
            log.warning(
                "%s z=%d folds on %.1f %% of its pixels (%d px; warning above %.0f %%): the render shows "
                "tissue there twice. Look at this section's fields in Neuroglancer; docs/estimators.md "
                "('Folds') says what causes folds and what to try.",
                self.what, z, 100 * self.share, self.folded, 100 * FOLD_WARNING_SHARE)
