"""downsample, cpc, convert-field and copy on real layers, each against an independent reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seamless_core import fields
from seamless_core.geometry import BBox
from seamless_core.steps.convert_field import ConvertParams, convert_field, prepare_convert
from seamless_core.steps.copy import CopyParams, copy_layer, prepare_copy
from seamless_core.steps.cpc import CpcParams, cpc, prepare_cpc
from seamless_core.steps.downsample import DownsampleParams, downsample, prepare_downsample
from seamless_core.steps.render import RenderParams, prepare_render, render
from seamless_core.synthetic import affine_field, smooth_random_field
from seamless_core.volumes import LayerKind, create_from_info, make_image_info, open_layer

from conftest import sample_section


def make_layer(path: Path, data: np.ndarray, kind: LayerKind = LayerKind.IMAGE, chunk: int = 128, max_mip: int = 3,
               resolution=(4, 4, 50), convention: bool = True):
    """A layer holding (z, c, y, x) `data` at MIP 0."""
    z, _, h, w = data.shape
    info = make_image_info(dtype=str(data.dtype), resolution=resolution, size=(w, h, z), chunk_xy=chunk,
                           max_mip=max_mip, kind=kind)
    if not convention:
        info["seamless"].pop("field", None)
        info["num_channels"] = data.shape[1]
    layer = create_from_info(str(path), info, kind)
    layer.write(BBox((0, 0, 0), (w, h, z)), data)
    return layer


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    *lead, h, w = a.shape
    return a.reshape(*lead, h // f, f, w // f, f).mean(axis=(-3, -1))


def test_downsample_image_is_the_rounded_block_average(tmp_path: Path) -> None:
    section = sample_section(1)
    make_layer(tmp_path / "img", section[None, None])
    params = DownsampleParams(src_mip=0, dst_mip=2)
    layer, region = prepare_downsample(str(tmp_path / "img"), LayerKind.IMAGE, None, params)
    downsample(layer, region, params)
    got1 = layer.read(layer.bounds(1))[0, 0]
    got2 = layer.read(layer.bounds(2))[0, 0]
    want1 = np.round(block_mean(section.astype(np.float64), 2)).astype(np.uint8)
    assert got1.shape == (256, 256) and np.abs(got1.astype(int) - want1).max() <= 1
    want2 = np.round(block_mean(got1.astype(np.float64), 2))
    assert np.abs(got2.astype(int) - want2).max() <= 1


def test_downsample_mask_max_keeps_every_defect_and_mode_takes_majority(tmp_path: Path) -> None:
    mask = np.zeros((1, 1, 256, 256), np.uint8)
    mask[0, 0, 10, 10] = 1  # a lone defect pixel
    mask[0, 0, 64:66, 64:65] = 1  # half a 2x2 block
    mask[0, 0, 128:130, 128:130] = 1  # a whole 2x2 block
    for rule in ("max", "mode"):
        make_layer(tmp_path / rule, mask, LayerKind.MASK, max_mip=1)
        params = DownsampleParams(src_mip=0, dst_mip=1, mask_rule=rule)
        layer, region = prepare_downsample(str(tmp_path / rule), LayerKind.MASK, None, params)
        downsample(layer, region, params)
        coarse = layer.read(layer.bounds(1))[0, 0]
        assert coarse[64, 64] == 1
        if rule == "max":
            assert coarse[5, 5] == 1 and coarse.sum() == 3
        else:
            assert coarse[5, 5] == 0


def test_downsample_field_halves_units(tmp_path: Path) -> None:
    field = (affine_field(256, 256, translation=(6.0, -2.0)) + smooth_random_field(256, 256, amplitude=4, seed=1))
    make_layer(tmp_path / "f", field.numpy(), LayerKind.FIELD, max_mip=2)
    params = DownsampleParams(src_mip=0, dst_mip=2)
    layer, region = prepare_downsample(str(tmp_path / "f"), LayerKind.FIELD, None, params)
    downsample(layer, region, params)
    got = layer.read(layer.bounds(2))
    want = block_mean(field.numpy().astype(np.float64), 4) / 4
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got, fields.resample(field, 0, 2).numpy(), atol=1e-5)


def test_cpc_scores_aligned_misaligned_and_empty_sections(tmp_path: Path) -> None:
    a = sample_section(0)
    shifted = np.roll(a, 9, axis=1)
    stack = np.stack([a, a, shifted, np.zeros_like(a)])[:, None]
    make_layer(tmp_path / "img", stack)
    params = CpcParams(mip=0, patch=32)
    src, dst, region = prepare_cpc(str(tmp_path / "img"), str(tmp_path / "cpc"), None, params)
    report = cpc(src, dst, region, params)
    by_z = {s["z"]: s for s in report.details["sections"]}
    assert set(by_z) == {1, 2, 3}  # section 0 has no predecessor
    assert by_z[1]["median"] > 0.999  # identical neighbours
    assert by_z[2]["median"] < 0.6  # 9 px misalignment
    assert by_z[3]["scored"] == 0 and by_z[3]["median"] is None  # no tissue: nothing scored, no fake number
    values = open_layer(str(tmp_path / "cpc"), LayerKind.QUALITY).read(dst.bounds(0).with_z(1, 4))
    assert values.shape == (3, 1, 16, 16)
    assert np.isnan(values[2]).all()
    # independent reference for one window: numpy Pearson r
    win_a, win_b = a[32:64, 64:96].ravel(), shifted[32:64, 64:96].ravel()
    assert abs(values[1, 0, 1, 2] - np.corrcoef(win_a, win_b)[0, 1]) < 1e-4
    summary = json.loads((tmp_path / "cpc" / "summary" / "2.json").read_text())
    assert summary == by_z[2]


def test_convert_corgie_and_legacy_fields_then_render_identically(tmp_path: Path) -> None:
    section = sample_section(2)[:256, :256]
    make_layer(tmp_path / "img", section[None, None], max_mip=2)
    ours = smooth_random_field(256, 256, amplitude=9, seed=4) + affine_field(256, 256, translation=(5.0, 2.0))
    make_layer(tmp_path / "ours", ours.numpy(), LayerKind.FIELD, max_mip=2)
    corgie = ours.numpy()[:, ::-1].copy()  # corgie: channel 0 along y
    make_layer(tmp_path / "corgie", corgie, LayerKind.FIELD, max_mip=2, convention=False)
    params = ConvertParams(source="corgie", mip=0)
    s, d, r = prepare_convert(str(tmp_path / "corgie"), str(tmp_path / "converted"), None, params)
    convert_field(s, d, r, params)
    outputs = []
    for field in ("ours", "converted"):
        rp = RenderParams(mip=0)
        layers = prepare_render(str(tmp_path / "img"), str(tmp_path / field), str(tmp_path / f"out_{field}"), None, rp)
        render(*layers[:3], layers[4], rp)
        outputs.append(open_layer(str(tmp_path / f"out_{field}"), LayerKind.IMAGE).read(layers[4]))
    assert np.array_equal(outputs[0], outputs[1])
    assert open_layer(str(tmp_path / "converted"), LayerKind.FIELD).seamless_info["converted_from"] == "corgie"

    # old SEAMLeSS: MIP-0 pixels at MIP 2 -> divide by 4
    legacy = np.full((1, 2, 64, 64), 8.0, np.float32)
    info = make_image_info(dtype="float32", resolution=(4, 4, 50), size=(256, 256, 1), chunk_xy=64, max_mip=2,
                           kind=LayerKind.FIELD)
    info["seamless"].pop("field")
    layer = create_from_info(str(tmp_path / "legacy"), info, LayerKind.FIELD)
    layer.write(BBox((0, 0, 0), (64, 64, 1), 2), legacy)
    params = ConvertParams(source="seamless-legacy", mip=2)
    s, d, r = prepare_convert(str(tmp_path / "legacy"), str(tmp_path / "legacy_ours"), None, params)
    convert_field(s, d, r, params)
    assert np.allclose(open_layer(str(tmp_path / "legacy_ours"), LayerKind.FIELD).read(r), 2.0)


def test_copy_is_exact_and_keeps_geometry(tmp_path: Path) -> None:
    stack = np.stack([sample_section(z) for z in range(3)])[:, None]
    make_layer(tmp_path / "img", stack)
    params = CopyParams(mip=0)
    region = BBox((0, 0, 1), (512, 512, 3))
    s, d, r = prepare_copy(str(tmp_path / "img"), str(tmp_path / "copy"), LayerKind.IMAGE, region, params)
    copy_layer(s, d, r, params)
    assert np.array_equal(d.read(region), stack[1:])
    assert d.bounds(0) == s.bounds(0) and d.resolution(2) == s.resolution(2)


def test_cuda_render_matches_cpu_when_a_gpu_is_present(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine; run on a GPU node to check CUDA against CPU")
    section = sample_section(0)
    make_layer(tmp_path / "img", section[None, None])
    make_layer(tmp_path / "f", smooth_random_field(512, 512, amplitude=20, seed=2).numpy(), LayerKind.FIELD)
    outs = []
    for device in ("cpu", "cuda"):
        rp = RenderParams(mip=0, device=device)
        layers = prepare_render(str(tmp_path / "img"), str(tmp_path / "f"), str(tmp_path / device), None, rp)
        render(*layers[:3], layers[4], rp)
        outs.append(open_layer(str(tmp_path / device), LayerKind.IMAGE).read(layers[4]).astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1
