"""ingest: turn a folder of section images (0.png, 1.png, ...) into a precomputed image layer."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .geometry import BBox
from .volumes import Layer, LayerKind, create_from_info, make_image_info

_NUMBERED = re.compile(r"^(\d+)\.(png|tif|tiff)$", re.IGNORECASE)


def numbered_images(folder: Path) -> list[Path]:
    """Section images named by their z index, in z order; refuses gaps, which would shift sections."""
    if not folder.is_dir():
        raise InputError(f"--images {folder} is not a folder")
    found = {int(m.group(1)): p for p in folder.iterdir() if (m := _NUMBERED.match(p.name))}
    if not found:
        raise InputError(f"--images {folder} holds no section images named <z>.png or <z>.tif")
    missing = sorted(set(range(min(found), max(found) + 1)) - set(found))
    if missing:
        raise InputError(f"--images {folder}: sections {missing[:10]} are missing between {min(found)} and {max(found)}")
    return [found[z] for z in sorted(found)]


def load_section(path: Path) -> np.ndarray:
    image = np.asarray(Image.open(path))
    if image.ndim != 2 or image.dtype != np.uint8:
        raise InputError(f"{path} is {image.dtype} with shape {image.shape}; sections must be 8-bit grayscale")
    return image


def ingest(folder: Path, dst: str, *, resolution: tuple[float, float, float], max_mip: int = 0,
           chunk_xy: int = 256, limit: int | None = None) -> Layer:
    """Write sections z = 0..N-1 at MIP 0 (downsample separately); idempotent."""
    paths = numbered_images(folder)[:limit]
    first = load_section(paths[0])
    height, width = first.shape
    info = make_image_info(dtype="uint8", resolution=resolution, size=(width, height, len(paths)),
                           chunk_xy=chunk_xy, max_mip=max_mip)
    layer = create_from_info(dst, info, LayerKind.IMAGE)
    for z, path in enumerate(paths):
        section = first if z == 0 else load_section(path)
        if section.shape != (height, width):
            raise InputError(f"{path} is {section.shape[::-1]} px but section 0 is {(width, height)}")
        layer.write(BBox((0, 0, z), (width, height, z + 1)), section[None, None])
    return layer
