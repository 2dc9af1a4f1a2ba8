"""Checks on what a run left on disk: every chunk whole and decodable, and byte-for-byte comparison."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from seamless_core.volumes import LayerKind, open_layer

SKIPPED_DIRS = {".seamless", ".staging", "report"}  # markers and logs, killed writers' debris, the HTML report
INFO_KIND = {"image": LayerKind.IMAGE, "field": LayerKind.FIELD, "mask": LayerKind.MASK, "quality": LayerKind.QUALITY}


def output_files(destination: Path) -> dict[str, bytes]:
    """Every data file a run wrote under `destination` (chunks, info, summaries), by relative path.

    Metadata may name the run's own layers (a CPC layer records its source): in info and JSON files the
    destination's path reads as "<destination>", so two runs into different folders compare equal.
    """
    files = {}
    for folder, dirs, names in os.walk(destination):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        for name in names:
            path = Path(folder) / name
            data = path.read_bytes()
            if name == "info" or name.endswith(".json"):
                data = data.replace(str(destination).encode(), b"<destination>")
            files[str(path.relative_to(destination))] = data
    return files


def layer_folders(destination: Path) -> list[Path]:
    """Every layer (a folder with an info file) under a destination."""
    found = []
    for folder, dirs, names in os.walk(destination):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS]
        if "info" in names:
            found.append(Path(folder))
    return sorted(found)


def torn_chunks(layer: Path) -> list[str]:
    """Chunk files of a raw layer whose size is not exactly their chunk's: what a torn write leaves."""
    try:
        info = json.loads((layer / "info").read_text())
    except json.JSONDecodeError as exc:
        raise AssertionError(f"torn info file {layer / 'info'}: {exc}") from None
    if info.get("seamless", {}).get("compress"):
        return []  # compressed chunks have no fixed size: `decode_everything` covers them
    itemsize = np.dtype(info["data_type"]).itemsize * int(info["num_channels"])
    problems = []
    for scale in info["scales"]:
        folder = layer / scale["key"]
        if not folder.is_dir():
            continue
        for chunk in folder.iterdir():
            (x, y, z) = ((int(a), int(b)) for a, b in (part.split("-") for part in chunk.name.split("_")))
            expected = (x[1] - x[0]) * (y[1] - y[0]) * (z[1] - z[0]) * itemsize
            if chunk.stat().st_size != expected:
                problems.append(f"{chunk}: {chunk.stat().st_size} bytes, a whole chunk has {expected}")
    return problems


def decode_everything(layer: Path) -> int:
    """Read every MIP of a layer through a fresh open_layer (missing chunks read as zeros: not yet
    written); a torn or undecodable chunk raises. Returns the voxels read."""
    info = json.loads((layer / "info").read_text())
    kind = INFO_KIND[info.get("seamless", {}).get("kind", "image")]
    opened = open_layer(str(layer), kind, fill_missing=True)
    voxels = 0
    for mip in opened.mips:
        voxels += opened.read(opened.bounds(mip)).size
    return voxels


def assert_whole(destination: Path) -> int:
    """Every layer under `destination` has only whole, decodable chunks; returns the layers checked."""
    layers = layer_folders(destination)
    for layer in layers:
        problems = torn_chunks(layer)
        assert not problems, f"torn chunk files in {layer}: {problems[:3]}"
        decode_everything(layer)
    return len(layers)


def staging_debris(destination: Path) -> tuple[int, int]:
    """(folders, bytes) that killed writers left under the layers' .staging folders."""
    folders = size = 0
    for staging in destination.rglob(".staging"):
        for entry in staging.iterdir():
            folders += 1
            size += sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
    return folders, size
