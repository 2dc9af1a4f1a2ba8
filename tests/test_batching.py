"""stack_pairs / split_fields: each member keeps its own geometry on the common canvas."""

from __future__ import annotations

import torch

from seamless_core.estimators.base import Pair
from seamless_core.estimators.batching import split_fields, stack_pairs


def test_members_keep_their_pixels_and_offsets() -> None:
    gen = torch.Generator().manual_seed(3)
    a = Pair(src=torch.rand(1, 1, 40, 50, generator=gen) + 0.1, tgt=torch.rand(1, 1, 30, 30, generator=gen) + 0.1,
             offset=(5, 7))
    b = Pair(src=torch.rand(1, 1, 36, 36, generator=gen) + 0.1, tgt=torch.rand(1, 1, 20, 24, generator=gen) + 0.1,
             offset=(2, 1), tgt_defects=torch.ones(1, 1, 20, 24))
    inits = [torch.randn(1, 2, 30, 30, generator=gen), torch.randn(1, 2, 20, 24, generator=gen)]
    batched, init, sizes = stack_pairs([a, b], inits)
    assert sizes == [(30, 30), (20, 24)] and batched.offset == (5, 7)
    field = init.clone()
    for member, original, start in zip((0, 1), (a, b), inits):
        # the source pixel a target pixel pulls from is the same on the canvas as in the member's window
        single = original.warp_src(start)
        together = batched.warp_src(init)[member : member + 1, :, : original.shape[0], : original.shape[1]]
        assert float((single - together).abs().max()) < 1e-4, float((single - together).abs().max())
        assert torch.equal(batched.tgt[member, :, : original.shape[0], : original.shape[1]], original.tgt[0])
    # padding carries no tissue (never pulls a field); a member without a mask gets an empty one
    assert float(batched.tgt[1, :, 20:, :].abs().sum()) == 0 and float(batched.tgt_defects[0].sum()) == 0
    assert [tuple(f.shape) for f in split_fields(field, sizes)] == [(1, 2, 30, 30), (1, 2, 20, 24)]
    assert torch.equal(split_fields(field, sizes)[1], inits[1])
