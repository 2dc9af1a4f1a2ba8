"""Geometry: MIP conversion, chunk grids, pad/crop — properties checked with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seamless_core.errors import InputError
from seamless_core.geometry import BBox, chunk_grid, crop_xy

coord = st.integers(min_value=-5000, max_value=5000)
extent = st.integers(min_value=1, max_value=700)


@st.composite
def boxes(draw, mip: int | None = None):
    start = (draw(coord), draw(coord), draw(st.integers(0, 50)))
    size = (draw(extent), draw(extent), draw(st.integers(1, 4)))
    return BBox.from_size(start, size, draw(st.integers(0, 6)) if mip is None else mip)


@given(boxes(), st.integers(0, 6))
def test_to_mip_covers_the_same_physical_region(box: BBox, mip: int) -> None:
    other = box.to_mip(mip)
    f_src, f_dst = 2**box.mip, 2**mip
    assert other.start[0] * f_dst <= box.start[0] * f_src and other.stop[0] * f_dst >= box.stop[0] * f_src
    assert other.start[1] * f_dst <= box.start[1] * f_src and other.stop[1] * f_dst >= box.stop[1] * f_src
    assert other.start[2] == box.start[2] and other.stop[2] == box.stop[2]  # z is not downsampled


@given(boxes(), st.integers(1, 4))
def test_finer_then_back_is_exact(box: BBox, levels: int) -> None:
    if box.mip < levels:
        return
    assert box.to_mip(box.mip - levels).to_mip(box.mip) == box


@given(boxes(mip=0), st.sampled_from([16, 64, 100, 256]), st.tuples(coord, coord))
@settings(max_examples=60)
def test_chunk_grid_tiles_region_exactly_and_aligned(box: BBox, chunk: int, offset: tuple[int, int]) -> None:
    grid_offset = (offset[0], offset[1], 0)
    bounds = box.padded(37)
    chunks = list(chunk_grid(box, (chunk, chunk, 1), grid_offset, bounds))
    covered = np.zeros((box.size[2], bounds.size[1], bounds.size[0]), dtype=np.int32)
    for c in chunks:
        assert bounds.contains(c)
        # each chunk starts on the grid or at the bounds, and is at most one chunk
        assert (c.start[0] - grid_offset[0]) % chunk == 0 or c.start[0] == bounds.start[0]
        assert (c.start[1] - grid_offset[1]) % chunk == 0 or c.start[1] == bounds.start[1]
        assert c.size[0] <= chunk and c.size[1] <= chunk and c.size[2] == 1
        covered[
            c.start[2] - box.start[2],
            c.start[1] - bounds.start[1] : c.stop[1] - bounds.start[1],
            c.start[0] - bounds.start[0] : c.stop[0] - bounds.start[0],
        ] += 1
    assert covered.max() == 1  # no overlap
    inner = covered[:, box.start[1] - bounds.start[1] : box.stop[1] - bounds.start[1],
                    box.start[0] - bounds.start[0] : box.stop[0] - bounds.start[0]]
    assert inner.min() == 1  # the region is covered


@given(boxes(), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40), st.integers(0, 40))
def test_pad_then_crop_is_identity(box: BBox, left: int, top: int, right: int, bottom: int) -> None:
    padded = box.padded((left, top, right, bottom))
    assert padded.contains(box)
    data = np.zeros((1, 1, padded.size[1], padded.size[0]))
    assert crop_xy(data, (left, top, right, bottom)).shape[-2:] == (box.size[1], box.size[0])


@given(boxes(mip=2), boxes(mip=2))
def test_intersection_is_contained_in_both(a: BBox, b: BBox) -> None:
    both = a.intersection(b)
    if not both.is_empty:
        assert a.contains(both) and b.contains(both)
    assert a.union(b).contains(a) and a.union(b).contains(b)


def test_parse_and_errors() -> None:
    box = BBox.parse("0,10,2:512,600,5", mip=1)
    assert box.start == (0, 10, 2) and box.stop == (512, 600, 5) and box.mip == 1
    with pytest.raises(InputError, match="x0,y0,z0:x1,y1,z1"):
        BBox.parse("0,0:10,10")
    with pytest.raises(InputError, match="before start"):
        BBox((10, 0, 0), (5, 5, 1))
    with pytest.raises(InputError, match="chunk size must be positive"):
        list(chunk_grid(box, (0, 64, 1), (0, 0, 0)))
