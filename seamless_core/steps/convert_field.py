"""convert-field: bring a field written by corgie or old SEAMLeSS into this project's convention.

Conventions differ silently between tools, so conversion is an explicit, documented command:
- corgie: channel 0 is the displacement along CloudVolume y, channel 1 along x (pixels of the MIP);
- old SEAMLeSS ("seamless-legacy"): displacements in MIP-0 pixels at every MIP.
Both use the pull convention. The result declares this project's convention in its info file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, LayerError
from ..geometry import BBox, RegionRequest, requested_region
from ..pipeline import run_chunks
from ..progress import Progress, StepReport
from ..volumes import INFO_KEY, Layer, LayerKind, _fetch_info, check_within, create_layer, normalise_path
from .common import check_processing_chunk, processing_chunks

SOURCES = ("corgie", "seamless-legacy")


@dataclass(frozen=True)
class ConvertParams:
    source: str
    mip: int
    chunk_xy: int | None = None
    fill_missing: bool = False
    prefetch: int = 2


def convert_values(data: np.ndarray, source: str, xy_factor: int) -> np.ndarray:
    """Convert (z, 2, y, x) displacements from `source`'s convention to ours."""
    if source == "corgie":
        return np.ascontiguousarray(data[:, ::-1])
    if source == "seamless-legacy":
        return (data / np.float32(xy_factor)).astype(np.float32)
    raise InputError(f"unknown field convention {source!r}: use one of {', '.join(SOURCES)}")


def convert_field(src: Layer, dst: Layer, region: BBox, params: ConvertParams, *,
                  progress_interval: float | None = None) -> StepReport:
    chunks = processing_chunks(dst, region, params.chunk_xy)
    factor = src.factors[params.mip][0]
    progress = Progress("convert-field", len(chunks), interval=progress_interval)
    run_chunks(chunks, src.read, lambda _c, d: convert_values(d, params.source, factor), dst.write, progress,
               prefetch=params.prefetch)
    report = progress.close()
    report.details.update({"from": params.source, "mip": params.mip})
    return report


def prepare_convert(src_path: str, dst_path: str, region: RegionRequest,
                    params: ConvertParams) -> tuple[Layer, Layer, BBox]:
    if params.source not in SOURCES:
        raise InputError(f"unknown field convention {params.source!r}: use --from {' or --from '.join(SOURCES)}")
    path = normalise_path(src_path)
    info = _fetch_info(path)
    if info is None:
        raise LayerError(f"--src: no layer at {path} (its info file is missing)")
    if info.get(INFO_KEY, {}).get("field"):
        raise LayerError(f"--src: {path} already declares this project's field convention; nothing to convert")
    if info["data_type"] != "float32" or int(info["num_channels"]) != 2:
        raise LayerError(
            f"--src: {path} has {info['num_channels']} channels of {info['data_type']}; a field has 2 of float32"
        )
    src = Layer(path, info, LayerKind.FIELD, params.fill_missing)
    region = requested_region(region, src.bounds(params.mip))
    check_within(src, region, "--src")
    check_processing_chunk(params.chunk_xy, src.chunk_size(params.mip)[0])
    dst = create_layer(dst_path, like=src, kind=LayerKind.FIELD, max_mip=max(src.mips),
                       chunk_xy=src.chunk_size(params.mip)[0], extra={"converted_from": params.source})
    return src, dst, region
