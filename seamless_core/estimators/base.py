"""The estimator contract: two sections in, one dense field out, no storage involved.

An estimator finds the pull field that aligns a source section onto a target section:
warp(src, field) ~ tgt on tissue. It works on tensors only, so it can be tested and benchmarked on two
arrays, and the compute_field step can run it chunk by chunk (with padding) on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .. import fields


@dataclass
class Pair:
    """A source window and a target chunk, both (N, 1, H, W) float in [0, 1]; 0 means no tissue.

    `src` may be larger than `tgt`: target pixel (0, 0) sits at `offset` = (x, y) in src's pixel frame,
    so displacements reaching beyond the chunk still find their pixels. Defect masks (nonzero = crack,
    fold, debris) exclude pixels from the similarity; black (0) pixels are excluded the same way.
    """

    src: torch.Tensor
    tgt: torch.Tensor
    offset: tuple[int, int] = (0, 0)
    src_defects: torch.Tensor | None = None
    tgt_defects: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.src.dim() != 4 or self.tgt.dim() != 4 or self.src.shape[1] != 1 or self.tgt.shape[1] != 1:
            raise ValueError(f"src and tgt must be (N, 1, H, W), got {tuple(self.src.shape)} and {tuple(self.tgt.shape)}")
        if self.src.shape[-2] < self.tgt.shape[-2] + self.offset[1] or self.src.shape[-1] < self.tgt.shape[-1] + self.offset[0]:
            raise ValueError(f"src {tuple(self.src.shape)} does not contain tgt {tuple(self.tgt.shape)} at offset {self.offset}")

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.tgt.shape[-2]), int(self.tgt.shape[-1])

    def coords(self, field: torch.Tensor) -> torch.Tensor:
        """Absolute src-window coordinates that `field` (over the target grid) pulls from."""
        h, w = self.shape
        grid = fields.pixel_grid(h, w, device=field.device, dtype=field.dtype)
        offset = torch.tensor(self.offset, dtype=field.dtype, device=field.device).view(1, 2, 1, 1)
        return grid + offset + field

    def warp_src(self, field: torch.Tensor) -> torch.Tensor:
        """The source resampled onto the target grid through `field`."""
        return fields.sample(self.src, self.coords(field))

    def src_invalid(self, field: torch.Tensor) -> torch.Tensor:
        """Target-grid pixels whose source sample touches black, defect or out-of-window pixels (bool).

        Outside the window the sampled value is 0 (black), so it must not pull the field either.
        """
        bad = self.src <= 0
        if self.src_defects is not None:
            bad = bad | (self.src_defects > 0)
        coords = self.coords(field)
        height, width = self.src.shape[-2:]
        outside = (
            (coords[:, :1] < 0) | (coords[:, :1] > width - 1) | (coords[:, 1:] < 0) | (coords[:, 1:] > height - 1)
        )
        return fields.sample_mask(bad, coords, rule="any") | outside

    def tgt_valid(self) -> torch.Tensor:
        """Target pixels that carry tissue and no defect (bool, N,1,H,W)."""
        ok = self.tgt > 0
        if self.tgt_defects is not None:
            ok = ok & (self.tgt_defects <= 0)
        return ok


class Estimator(Protocol):
    """Anything that refines a field: block matching, the finetuner, the learned pyramid."""

    name: str

    def __call__(self, pair: Pair, init: torch.Tensor | None = None) -> torch.Tensor:
        """The total pull field (N, 2, H, W) over the target grid, starting from `init` (zeros if None)."""
        ...
