"""The local demo: misalign the real sample with known fields, then render, downsample and score it.

It runs the same step functions the `seamless` subcommands run, so it doubles as a smoke test of the
whole core on real data; each stage prints the equivalent CLI command.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .ingest import ingest
from .neuroglancer import viewer_link
from .steps.common import to_numpy
from .steps.cpc import CpcParams, cpc, prepare_cpc
from .steps.downsample import DownsampleParams, downsample, prepare_downsample
from .steps.render import RenderParams, prepare_render, render
from .synthetic import section_misalignment
from .volumes import LayerKind, create_layer, normalise_path

log = logging.getLogger("seamless.demo")


@dataclass(frozen=True)
class DemoResult:
    original: str
    misaligned: str
    field: str
    cpc_original: list[dict[str, Any]]
    cpc_misaligned: list[dict[str, Any]]
    link: str


def run_demo(data: Path, out: Path, *, sections: int | None = None, device: str = "cpu", seed: int = 0) -> DemoResult:
    out = out.resolve()
    original_path = normalise_path(str(out / "original"))
    log.info("ingest: seamless ingest --images %s --dst %s --resolution 4,4,50", data, original_path)
    original = ingest(data, original_path, resolution=(4, 4, 50), max_mip=3, chunk_xy=256, limit=sections)
    _downsample(original_path, LayerKind.IMAGE, device)

    field_path = normalise_path(str(out / "known_field"))
    field = create_layer(field_path, like=original, kind=LayerKind.FIELD, max_mip=3, chunk_xy=256)
    bounds = original.bounds(0)
    width, height, depth = bounds.size
    for z in range(depth):  # section 0 stays put: it anchors the stack
        known = section_misalignment(height, width, seed=seed + 7919 * z) if z else np.zeros((1, 2, height, width))
        field.write(bounds.with_z(z), to_numpy(_as_tensor(known), "float32"))

    misaligned_path = normalise_path(str(out / "misaligned"))
    log.info("render: seamless render --src %s --field %s --dst %s --mip 0", original_path, field_path, misaligned_path)
    params = RenderParams(mip=0, device=device)
    src, fld, dst, _, region = prepare_render(original_path, field_path, misaligned_path, None, params, chunk_storage=256)
    render(src, fld, dst, region, params)
    _downsample(misaligned_path, LayerKind.IMAGE, device)

    summaries = []
    for name in ("original", "misaligned"):
        cpc_path = normalise_path(str(out / f"cpc_{name}"))
        log.info("cpc: seamless cpc --src %s --dst %s --mip 1 --patch 32", normalise_path(str(out / name)), cpc_path)
        cparams = CpcParams(mip=1, patch=32, device=device)
        s, d, r = prepare_cpc(normalise_path(str(out / name)), cpc_path, None, cparams)
        summaries.append(cpc(s, d, r, cparams).details["sections"])
    link = viewer_link([("original", original_path), ("misaligned", misaligned_path)], serve_root=str(out),
                       position=(width / 2, height / 2, 1))
    return DemoResult(original_path, misaligned_path, field_path, summaries[0], summaries[1], link)


def _downsample(path: str, kind: LayerKind, device: str) -> None:
    log.info("downsample: seamless downsample --src %s --mip 0 --dst-mip 3", path)
    params = DownsampleParams(src_mip=0, dst_mip=3, device=device)
    layer, region = prepare_downsample(path, kind, None, params)
    downsample(layer, region, params)


def _as_tensor(array):
    import torch

    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array, dtype=np.float32))
