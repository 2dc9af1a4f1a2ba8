"""Layers: derivation from a source, idempotent creation, corrupt chunks, staging debris."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from seamless_core.errors import LayerError
from seamless_core.geometry import BBox
from seamless_core.volumes import (
    FIELD_CONVENTION,
    LayerKind,
    clean_stale_staging,
    create_from_info,
    create_layer,
    make_image_info,
    open_layer,
)


@pytest.fixture
def source(tmp_path: Path):
    info = make_image_info(dtype="uint8", resolution=(4, 4, 40), size=(300, 200, 5), voxel_offset=(10, 20, 3),
                           chunk_xy=64, max_mip=2)
    layer = create_from_info(str(tmp_path / "src"), info, LayerKind.IMAGE)
    return layer


def test_destination_derives_geometry_and_chunking_from_source(tmp_path: Path, source) -> None:
    field = create_layer(str(tmp_path / "field"), like=source, kind=LayerKind.FIELD, max_mip=3)
    for mip in range(3):
        assert field.resolution(mip) == source.resolution(mip)
        assert field.bounds(mip) == source.bounds(mip)
        assert field.chunk_size(mip) == (64, 64, 1)
    assert field.resolution(3) == (32.0, 32.0, 40.0)  # derived beyond the source's pyramid
    assert field.dtype == "float32" and field.num_channels == 2
    reopened = open_layer(str(tmp_path / "field"), LayerKind.FIELD)
    assert reopened.seamless_info["field"] == FIELD_CONVENTION
    again = create_layer(str(tmp_path / "field"), like=source, kind=LayerKind.FIELD, max_mip=3)  # a retry
    assert again.info == reopened.info


def test_unreadable_chunk_is_a_clear_layer_error(tmp_path: Path, source) -> None:
    box = BBox((10, 20, 3), (74, 84, 4))
    source.write(box, np.full((1, 1, 64, 64), 7, np.uint8))
    chunk_dir = tmp_path / "src" / "4_4_40"
    (victim,) = [p for p in chunk_dir.iterdir() if p.name.startswith("10-74_20-84_3-4")]
    victim.write_bytes(victim.read_bytes()[:10])  # a chunk truncated by some other tool
    with pytest.raises(LayerError, match=r"unreadable chunk in \[10,20,3:74,84,4\]@mip0"):
        open_layer(str(tmp_path / "src"), LayerKind.IMAGE).read(box)


def test_missing_chunk_names_the_region_and_the_fix(tmp_path: Path, source) -> None:
    with pytest.raises(LayerError, match="has no data in .* pass --fill-missing"):
        source.read(BBox((10, 20, 4), (74, 84, 5)))
    filled = open_layer(str(tmp_path / "src"), LayerKind.IMAGE, fill_missing=True)
    assert not filled.read(BBox((10, 20, 4), (74, 84, 5))).any()


def test_stale_staging_is_removed_and_fresh_staging_kept(tmp_path: Path, source) -> None:
    staging = tmp_path / "src" / ".staging"
    old, fresh = staging / "old", staging / "fresh"
    for folder in (old, fresh):
        (folder / "4_4_40").mkdir(parents=True)
        (folder / "4_4_40" / "0-64_0-64_0-1.gz").write_bytes(b"half a chunk")
    past = time.time() - 7 * 3600
    os.utime(old, (past, past))
    assert clean_stale_staging(source) == 1
    assert not old.exists() and fresh.exists()


def test_staging_removed_by_its_writer_during_the_scan_is_skipped(tmp_path: Path, source, monkeypatch) -> None:
    """Concurrent steps on one layer: a writer removes its own staging folder after the cleaner listed it
    (seen in CI as a FileNotFoundError from a render's create_layer). The removal happens for real, on disk,
    between the listing and the look at each entry; only its timing is forced."""
    staging = tmp_path / "src" / ".staging"
    vanishing, old = staging / "vanishing", staging / "old"
    for folder in (vanishing, old):
        (folder / "4_4_40").mkdir(parents=True)
    past = time.time() - 7 * 3600
    for folder in (vanishing, old):
        os.utime(folder, (past, past))
    listed = os.scandir

    def scandir_then_writer_finishes(path):  # noqa: ANN001, ANN202 - os.scandir's signature
        if isinstance(path, int) or os.fspath(path) != str(staging):
            return listed(path)  # shutil.rmtree lists folders too (by descriptor)
        entries = list(listed(path))
        shutil.rmtree(vanishing)  # the writer's own cleanup, after the listing
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_writer_finishes)
    assert clean_stale_staging(source) == 1
    assert not old.exists() and not vanishing.exists()


def test_writes_must_be_chunk_aligned_and_typed(source) -> None:
    with pytest.raises(ValueError, match="not aligned"):
        source.write(BBox((11, 20, 3), (75, 84, 4)), np.zeros((1, 1, 64, 64), np.uint8))
    with pytest.raises(ValueError, match="float32 data to uint8 layer"):
        source.write(BBox((10, 20, 3), (74, 84, 4)), np.zeros((1, 1, 64, 64), np.float32))
    # the volume's far edge: a partial chunk is aligned
    source.write(BBox((266, 212, 3), (310, 220, 4)), np.ones((1, 1, 8, 44), np.uint8))


def test_direct_file_reads_and_writes_equal_cloudvolume_byte_for_byte(tmp_path: Path) -> None:
    """The fast file:// path (raw chunks read and written without CloudVolume) must be CloudVolume exactly.

    Odd geometry on purpose: a voxel offset, a size that is not a multiple of the chunk, 2 channels and
    boxes that straddle chunks and the volume's bounds.
    """
    from cloudvolume import CloudVolume

    from seamless_core.volumes import LayerKind, create_from_info, make_image_info

    info = make_image_info(dtype="float32", resolution=(4, 4, 40), size=(300, 260, 3), voxel_offset=(10, 20, 5),
                           chunk_xy=128, max_mip=0, kind=LayerKind.FIELD)
    layer = create_from_info(str(tmp_path / "direct"), info, LayerKind.FIELD)
    assert layer._direct_io(0)
    rng = np.random.default_rng(7)
    bounds = layer.bounds(0)
    full = rng.standard_normal((3, 2, 260, 300)).astype(np.float32)
    layer.write(bounds, full)  # chunk-aligned at the offset, clipped at the far bounds
    reference = CloudVolume(layer.path, mip=0, fill_missing=False, bounded=False)
    stored = np.asarray(reference[bounds.to_slices()]).transpose(2, 3, 1, 0)
    assert np.array_equal(stored, full)  # CloudVolume reads what the direct writer wrote
    for _ in range(60):
        x0, y0 = rng.integers(-40, 320), rng.integers(-40, 290)
        box = BBox((int(x0), int(y0), 5 + int(rng.integers(0, 3))),
                   (int(x0 + rng.integers(1, 200)), int(y0 + rng.integers(1, 200)), 8), 0)
        expected = np.asarray(reference[box.to_slices()]).transpose(2, 3, 1, 0)
        assert np.array_equal(layer.read(box), expected), box
    # and the direct writer's chunk files are the ones CloudVolume itself would write
    twin = create_from_info(str(tmp_path / "twin"), info, LayerKind.FIELD)
    CloudVolume(twin.path, mip=0, bounded=True, non_aligned_writes=False, compress=False)[bounds.to_slices()] = full.transpose(3, 2, 0, 1)
    scale_key = info["scales"][0]["key"]
    names = sorted(p.name for p in (tmp_path / "direct" / scale_key).iterdir() if not p.name.startswith("."))
    assert names == sorted(p.name for p in (tmp_path / "twin" / scale_key).iterdir())
    for name in names:
        assert (tmp_path / "direct" / scale_key / name).read_bytes() == (tmp_path / "twin" / scale_key / name).read_bytes()
