"""Stacks whose exact alignment is known, and ways to damage them the way real volumes are damaged.

Every section of a translated stack is the same real ssTEM tissue cropped at a known offset, a multiple
of 4 px, so each field the serial preset (block matching at MIP 2) finds is exact and every damage's
effect on a neighbour is measurable to a fraction of a pixel, not hidden in estimator noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from seamless_core.cli import main
from seamless_core.errors import ExitCode
from seamless_core.volumes import Layer, LayerKind, open_layer

from conftest import sample_section
from test_steps import make_layer


def translated_stack(root: Path, shifts: list[tuple[int, int]], size: int = 256, chunk: int = 64) -> Path:
    """Section z = the sample's section 0 cropped at (128 + dx_z, 128 + dy_z); MIPs 0-3 built."""
    tissue = sample_section(0)
    sections = [tissue[128 + dy : 128 + dy + size, 128 + dx : 128 + dx + size] for dx, dy in shifts]
    path = root / "source"
    make_layer(path, np.stack(sections)[:, None], chunk=chunk, max_mip=3)
    assert main(["downsample", "--src", str(path), "--mip", "0", "--dst-mip", "3"]) == ExitCode.OK
    return path


def truth(shift: tuple[int, int], anchor: tuple[int, int], mip: int) -> tuple[float, float]:
    """The pull displacement (x, y) at `mip` that aligns a section cropped at `shift` onto the anchor's."""
    return ((anchor[0] - shift[0]) / 2**mip, (anchor[1] - shift[1]) / 2**mip)


def overwrite_section(layer: Layer, z: int, value: int) -> None:
    """Section z at every MIP set to one grey value (0: a black, empty section)."""
    for mip in layer.mips:
        box = layer.bounds(mip).with_z(z)
        layer.write(box, np.full((1, 1, box.size[1], box.size[0]), value, np.uint8))


def delete_section(path: Path, z: int) -> int:
    """Remove every chunk file of section z, at every MIP (a section missing from the source)."""
    removed = 0
    layer = open_layer(str(path), LayerKind.IMAGE)
    for mip in layer.mips:
        for chunk in (path / layer.scale(mip)["key"]).glob(f"*_{z}-{z + 1}"):
            chunk.unlink()
            removed += 1
    return removed


def section_of(layer_path: Path, kind: LayerKind, z: int, mip: int) -> np.ndarray:
    layer = open_layer(str(layer_path), kind)
    return layer.read(layer.bounds(mip).with_z(z))[0]

