"""Bounding boxes in voxels at a MIP level, conversion between MIPs, chunk grids, pad and crop.

Coordinates follow CloudVolume: (x, y, z), start inclusive, stop exclusive, in voxels of one MIP
level. MIP m is downsampled by the layer's scale factors (2^m in x and y, 1 in z by default).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from .errors import InputError

Vec3 = tuple[int, int, int]


def default_factor(mip: int) -> Vec3:
    """Downsampling factor of MIP `mip` relative to MIP 0 when the layer does not say otherwise."""
    return (2**mip, 2**mip, 1)


@dataclass(frozen=True, order=True)
class BBox:
    """An axis-aligned box of voxels at one MIP level."""

    start: Vec3
    stop: Vec3
    mip: int = 0

    def __post_init__(self) -> None:
        if len(self.start) != 3 or len(self.stop) != 3:
            raise InputError(f"a bounding box needs 3 coordinates (x, y, z), got {self.start} and {self.stop}")
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))
        if any(b < a for a, b in zip(self.start, self.stop)):
            raise InputError(f"bounding box stop {self.stop} is before start {self.start}")
        if self.mip < 0:
            raise InputError(f"MIP must be >= 0, got {self.mip}")

    @classmethod
    def from_size(cls, start: Sequence[int], size: Sequence[int], mip: int = 0) -> BBox:
        return cls(tuple(start), tuple(a + s for a, s in zip(start, size)), mip)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str, mip: int = 0) -> BBox:
        """Parse 'x0,y0,z0:x1,y1,z1' (the CLI's --bbox form)."""
        try:
            lo, hi = text.split(":")
            start = tuple(int(v) for v in lo.split(","))
            stop = tuple(int(v) for v in hi.split(","))
        except ValueError:
            raise InputError(f"cannot read bounding box {text!r}: write it as x0,y0,z0:x1,y1,z1") from None
        if len(start) != 3 or len(stop) != 3:
            raise InputError(f"cannot read bounding box {text!r}: write it as x0,y0,z0:x1,y1,z1")
        return cls(start, stop, mip)  # type: ignore[arg-type]

    @property
    def size(self) -> Vec3:
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    @property
    def is_empty(self) -> bool:
        return any(s == 0 for s in self.size)

    @property
    def z_range(self) -> range:
        return range(self.start[2], self.stop[2])

    def volume(self) -> int:
        return math.prod(self.size)

    def with_z(self, z_start: int, z_stop: int | None = None) -> BBox:
        """The same xy extent over sections [z_start, z_stop) (one section when z_stop is omitted)."""
        z_stop = z_start + 1 if z_stop is None else z_stop
        return BBox((self.start[0], self.start[1], z_start), (self.stop[0], self.stop[1], z_stop), self.mip)

    def padded(self, xy: int | tuple[int, int, int, int]) -> BBox:
        """Grow in x and y: `xy` pixels on every side, or (left, top, right, bottom)."""
        left, top, right, bottom = (xy, xy, xy, xy) if isinstance(xy, int) else xy
        return BBox(
            (self.start[0] - left, self.start[1] - top, self.start[2]),
            (self.stop[0] + right, self.stop[1] + bottom, self.stop[2]),
            self.mip,
        )

    def intersection(self, other: BBox) -> BBox:
        """Overlap of two boxes at the same MIP (an empty box when they do not overlap)."""
        self._same_mip(other)
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop))
        return BBox(start, stop, self.mip)  # type: ignore[arg-type]

    def union(self, other: BBox) -> BBox:
        """Smallest box containing both."""
        self._same_mip(other)
        start = tuple(min(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(max(a, b) for a, b in zip(self.stop, other.stop))
        return BBox(start, stop, self.mip)  # type: ignore[arg-type]

    def contains(self, other: BBox) -> bool:
        self._same_mip(other)
        return all(a <= b for a, b in zip(self.start, other.start)) and all(
            a >= b for a, b in zip(self.stop, other.stop)
        )

    def translated(self, offset: Sequence[int]) -> BBox:
        return BBox(
            tuple(a + o for a, o in zip(self.start, offset)),  # type: ignore[arg-type]
            tuple(b + o for b, o in zip(self.stop, offset)),  # type: ignore[arg-type]
            self.mip,
        )

    def to_mip(self, mip: int, factors: dict[int, Vec3] | None = None) -> BBox:
        """The box at another MIP, rounded outward so it always covers the same physical region.

        `factors` maps MIP -> downsampling factor relative to MIP 0 (from the layer's scales);
        2^m in x and y is assumed when omitted.
        """
        if mip == self.mip:
            return self
        f_src = (factors or {}).get(self.mip, default_factor(self.mip))
        f_dst = (factors or {}).get(mip, default_factor(mip))
        start = tuple(math.floor(a * fs / fd) for a, fs, fd in zip(self.start, f_src, f_dst))
        stop = tuple(math.ceil(b * fs / fd) for b, fs, fd in zip(self.stop, f_src, f_dst))
        return BBox(start, stop, mip)  # type: ignore[arg-type]

    def to_slices(self) -> tuple[slice, slice, slice]:
        """Slices for CloudVolume indexing: cv[bbox.to_slices()]."""
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def aligned_to(self, chunk_size: Vec3, grid_offset: Vec3) -> BBox:
        """Expand outward to whole chunks of a grid starting at `grid_offset`."""
        start = tuple(o + (a - o) // c * c for a, c, o in zip(self.start, chunk_size, grid_offset))
        stop = tuple(o + -(-(b - o) // c) * c for b, c, o in zip(self.stop, chunk_size, grid_offset))
        return BBox(start, stop, self.mip)  # type: ignore[arg-type]

    def _same_mip(self, other: BBox) -> None:
        if other.mip != self.mip:
            raise ValueError(f"boxes at different MIPs ({self.mip} and {other.mip}): convert with to_mip first")

    def __str__(self) -> str:
        (x0, y0, z0), (x1, y1, z1) = self.start, self.stop
        return f"[{x0},{y0},{z0}:{x1},{y1},{z1}]@mip{self.mip}"


def reach_beyond(chunk: BBox, window: BBox) -> int:
    """How far (px) `window` extends beyond `chunk` on its worst side: what a field pulls from outside."""
    return max(chunk.start[0] - window.start[0], window.stop[0] - chunk.stop[0],
               chunk.start[1] - window.start[1], window.stop[1] - chunk.stop[1])


def chunk_grid(region: BBox, chunk_size: Vec3, grid_offset: Vec3, bounds: BBox | None = None) -> Iterator[BBox]:
    """Chunks of a grid (aligned to `grid_offset`) that cover `region`, clipped to `bounds`.

    Writes through these chunks are chunk-aligned by construction: a chunk either is a whole
    storage chunk or ends at the volume's boundary, so CloudVolume never reads-modifies-writes.
    """
    if any(c <= 0 for c in chunk_size):
        raise InputError(f"chunk size must be positive, got {chunk_size}")
    aligned = region.aligned_to(chunk_size, grid_offset)
    clip = bounds if bounds is not None else aligned
    for z in range(aligned.start[2], aligned.stop[2], chunk_size[2]):
        for y in range(aligned.start[1], aligned.stop[1], chunk_size[1]):
            for x in range(aligned.start[0], aligned.stop[0], chunk_size[0]):
                chunk = BBox((x, y, z), (x + chunk_size[0], y + chunk_size[1], z + chunk_size[2]), region.mip)
                chunk = chunk.intersection(clip)
                if not chunk.is_empty:
                    yield chunk


def crop_xy(array, pad: int | tuple[int, int, int, int]):
    """Crop a (..., H, W) array or tensor by `pad` pixels (or (left, top, right, bottom)) in x and y."""
    left, top, right, bottom = (pad, pad, pad, pad) if isinstance(pad, int) else pad
    h, w = array.shape[-2], array.shape[-1]
    return array[..., top : h - bottom, left : w - right]


#: The region a step is asked to process: a box, a rule that derives one from the source layer's bounds
#: at the step's MIP (the CLI's --bbox/--z: resolved against the layer the step opens anyway, so the
#: source is opened once), or None for the whole source.
RegionRequest = BBox | Callable[[BBox], BBox] | None


def requested_region(request: RegionRequest, bounds: BBox) -> BBox:
    """The box a RegionRequest asks for, given the source's bounds."""
    if request is None:
        return bounds
    return request(bounds) if callable(request) else request
