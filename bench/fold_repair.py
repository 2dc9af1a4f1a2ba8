"""Prototypes, not in seamless_core: two ways to fields that do not fold (docs/estimators.md, "Folds").

* `unfold`: smooth a field where its Jacobian determinant is below `min_det`, with a Gaussian whose sigma
  grows every 10 passes, until no such pixel is left (at most `passes` passes). It works at MIP 2, where
  the `serial` stage's field lives, and so reaches far: it needs no chunk borders here, but a step would
  need a wide context around each chunk.
* `tear_free`: block matching keeps only the largest set of accepted patches that are linked through
  neighbours whose vectors differ by less than `fraction` x stride (no tear between them); the other
  patches are filled from it as rejected ones are.

bench/chain_diagnosis.py uses both (--unfold, --tear-free).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from seamless_core import fields
from seamless_core.estimators.block_matching import BlockMatching, gaussian_blur


def unfold(field: torch.Tensor, min_det: float = 0.2, mip: int = 2, sigma: float = 1.5, passes: int = 50) -> torch.Tensor:
    """The MIP-0 `field` smoothed at `mip` where its determinant is < min_det (dilated by 2 px there)."""
    small = fields.resample(field, 0, mip)
    for index in range(passes):
        low = fields.jacobian_determinant(small) < min_det
        if not bool(low.any()):
            break
        region = F.max_pool2d(low.float(), 5, 1, 2) > 0
        small = torch.where(region, gaussian_blur(small, sigma * (1 + index // 10)), small)
    return fields.resample(small, mip, 0)


def largest_linked_set(vectors: torch.Tensor, accepted: torch.Tensor, link: float) -> torch.Tensor:
    """(N, 1, ny, nx) mask of the largest set of accepted patches connected through 4-neighbours whose
    vectors (N, 2, ny, nx) differ by less than `link` px."""
    n, _, ny, nx = vectors.shape
    none = float(ny * nx)
    index = torch.arange(ny * nx, dtype=torch.float32).view(1, 1, ny, nx).expand(n, 1, ny, nx)
    labels = torch.where(accepted, index, torch.full_like(index, none))
    v = torch.nan_to_num(vectors)
    across = accepted[..., 1:] & accepted[..., :-1] & ((v[..., 1:] - v[..., :-1]).norm(dim=1, keepdim=True) < link)
    down = (accepted[..., 1:, :] & accepted[..., :-1, :]
            & ((v[..., 1:, :] - v[..., :-1, :]).norm(dim=1, keepdim=True) < link))
    for _ in range(ny * nx):  # propagate the smallest label along the links until nothing changes
        spread = labels.clone()
        spread[..., 1:] = torch.where(across, torch.minimum(spread[..., 1:], labels[..., :-1]), spread[..., 1:])
        spread[..., :-1] = torch.where(across, torch.minimum(spread[..., :-1], labels[..., 1:]), spread[..., :-1])
        spread[..., 1:, :] = torch.where(down, torch.minimum(spread[..., 1:, :], labels[..., :-1, :]), spread[..., 1:, :])
        spread[..., :-1, :] = torch.where(down, torch.minimum(spread[..., :-1, :], labels[..., 1:, :]), spread[..., :-1, :])
        if torch.equal(spread, labels):
            break
        labels = spread
    keep = torch.zeros_like(accepted)
    for item in range(n):
        found = labels[item][accepted[item]]
        if found.numel():
            values, counts = found.unique(return_counts=True)
            keep[item] = accepted[item] & (labels[item] == values[counts.argmax()])
    return keep


@contextlib.contextmanager
def tear_free(fraction: float) -> Iterator[None]:
    """Within the block, BlockMatching keeps only its largest tear-free set of accepted patches."""
    consistent = BlockMatching._consistent

    def largest(self: BlockMatching, vectors: torch.Tensor, accepted: torch.Tensor) -> torch.Tensor:
        kept = accepted & consistent(self, vectors, accepted)
        return largest_linked_set(vectors, kept, fraction * self.stride)

    BlockMatching._consistent = largest  # type: ignore[method-assign]
    try:
        yield
    finally:
        BlockMatching._consistent = consistent  # type: ignore[method-assign]
