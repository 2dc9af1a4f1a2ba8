"""render: chunked rendering through real layers equals rendering the whole section at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from seamless_core import fields
from seamless_core.errors import DisplacementTooLarge, InputError
from seamless_core.geometry import BBox
from seamless_core.steps.render import RenderParams, prepare_render, render
from seamless_core.synthetic import affine_field, smooth_random_field
from seamless_core.volumes import LayerKind, create_from_info, create_layer, make_image_info, open_layer

from conftest import sample_section

SIZE = 2048


def tiled_sample(size: int) -> np.ndarray:
    """A size x size float image in [0, 1] tiled from real sections (real EM texture everywhere)."""
    tiles = [sample_section(z) for z in range(4)]
    rows = [np.concatenate([tiles[(r + c) % 4] for c in range(size // 512)], axis=1) for r in range(size // 512)]
    return (np.concatenate(rows, axis=0) / 255.0).astype(np.float32)


@pytest.fixture(scope="module")
def big_layers(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("render")
    image = tiled_sample(SIZE)
    src = create_from_info(str(root / "src"), make_image_info(dtype="float32", resolution=(4, 4, 50),
                           size=(SIZE, SIZE, 1), chunk_xy=256, max_mip=2), LayerKind.IMAGE)
    src.write(BBox((0, 0, 0), (SIZE, SIZE, 1)), image[None, None])
    # 40 px translation plus a 12 px smooth warp: displacements far beyond one 256 px storage chunk's pad
    field = affine_field(SIZE, SIZE, translation=(40.0, -33.0), rotation_deg=0.3) + smooth_random_field(
        SIZE, SIZE, amplitude=12.0, wavelength=300, seed=3)
    field_layer = create_layer(str(root / "field"), like=src, kind=LayerKind.FIELD, max_mip=2, chunk_xy=256)
    field_layer.write(BBox((0, 0, 0), (SIZE, SIZE, 1)), field.numpy())
    coarse = fields.resample(field, 0, 2)
    field_layer.write(BBox((0, 0, 0), (SIZE // 4, SIZE // 4, 1), 2), coarse.numpy())
    return {"root": root, "image": torch.from_numpy(image)[None, None], "field": field, "coarse": coarse}


def _whole(image: torch.Tensor, field: torch.Tensor) -> np.ndarray:
    return fields.warp(image.double(), field.double())[0, 0].float().numpy()


def _render(big_layers, name: str, chunk: int, field_mip: int = 0) -> np.ndarray:
    root: Path = big_layers["root"]  # type: ignore[assignment]
    params = RenderParams(mip=0, field_mip=field_mip, chunk_xy=chunk)
    src, field, dst, _, region = prepare_render(str(root / "src"), str(root / "field"), str(root / name), None,
                                                params, chunk_storage=256)
    render(src, field, dst, region, params)
    return open_layer(str(root / name), LayerKind.IMAGE).read(region)[0, 0]


@pytest.mark.parametrize("chunk", [256, 512, 1024])
def test_chunked_render_equals_whole_image_render(big_layers, chunk: int) -> None:
    # The reference warps the whole section in float64: grid_sample's float32 coordinate arithmetic on a
    # 2048-wide input alone rounds by ~1e-4 px, which is not what this test is about (seams are).
    whole = _whole(big_layers["image"], big_layers["field"])
    chunked = _render(big_layers, f"out_{chunk}", chunk)
    assert float(np.abs(whole).max()) > 0.5  # the image really moved through tissue, not black
    assert np.abs(chunked - whole).max() < 1e-4


@pytest.mark.parametrize("chunk", [256, 1024])
def test_coarse_field_upsampled_per_chunk_has_no_seams(big_layers, chunk: int) -> None:
    upsampled = fields.resample(big_layers["coarse"], 2, 0)
    whole = _whole(big_layers["image"], upsampled)
    chunked = _render(big_layers, f"coarse_{chunk}", chunk, field_mip=2)
    assert np.abs(chunked - whole).max() < 1e-4


def _small_layers(tmp_path: Path, field: torch.Tensor, image: np.ndarray | None = None):
    h, w = field.shape[-2:]
    image = sample_section(0)[:h, :w] if image is None else image
    src = create_from_info(str(tmp_path / "src"), make_image_info(dtype="uint8", resolution=(4, 4, 50),
                           size=(w, h, 1), chunk_xy=128), LayerKind.IMAGE)
    src.write(BBox((0, 0, 0), (w, h, 1)), image[None, None])
    layer = create_layer(str(tmp_path / "field"), like=src, kind=LayerKind.FIELD, max_mip=0, chunk_xy=128)
    layer.write(BBox((0, 0, 0), (w, h, 1)), field.numpy())
    return src, image


def test_mask_blacks_out_the_defect_where_it_lands(tmp_path: Path) -> None:
    field = affine_field(256, 256, translation=(10.0, 0.0))
    src, image = _small_layers(tmp_path, field)
    mask_info = make_image_info(dtype="uint8", resolution=(4, 4, 50), size=(256, 256, 1), chunk_xy=128,
                                kind=LayerKind.MASK)
    mask = create_from_info(str(tmp_path / "mask"), mask_info, LayerKind.MASK)
    defect = np.zeros((1, 1, 256, 256), np.uint8)
    defect[..., 100:120, 100:120] = 1
    mask.write(BBox((0, 0, 0), (256, 256, 1)), defect)
    params = RenderParams(mip=0)
    layers = prepare_render(str(tmp_path / "src"), str(tmp_path / "field"), str(tmp_path / "out"), None, params,
                            mask_path=str(tmp_path / "mask"))
    render(*layers[:3], layers[4], params, mask=layers[3])
    out = open_layer(str(tmp_path / "out"), LayerKind.IMAGE).read(BBox((0, 0, 0), (256, 256, 1)))[0, 0]
    # pulled from x+10: the defect at x 100..119 appears at x 90..109 in the output
    assert (out[100:120, 90:110] == 0).all()
    assert (out[100:120, 120:140] == image[100:120, 130:150]).all()  # untouched tissue beside it
    assert (out[130:, :200] == image[130:, 10:210]).all()


def test_too_large_displacement_is_refused_not_clipped(tmp_path: Path) -> None:
    _small_layers(tmp_path, affine_field(256, 256, translation=(300.0, 0.0)))
    params = RenderParams(mip=0, max_reach=200)
    layers = prepare_render(str(tmp_path / "src"), str(tmp_path / "field"), str(tmp_path / "out"), None, params)
    with pytest.raises(DisplacementTooLarge, match="beyond chunk .* reach of 200 px"):
        render(*layers[:3], layers[4], params)


def test_nan_in_field_is_an_error_naming_the_layer(tmp_path: Path) -> None:
    field = affine_field(256, 256, translation=(3.0, 0.0))
    field[0, 0, 5, 5] = float("nan")
    _small_layers(tmp_path, field)
    params = RenderParams(mip=0)
    layers = prepare_render(str(tmp_path / "src"), str(tmp_path / "field"), str(tmp_path / "out"), None, params)
    with pytest.raises(InputError, match="NaN or infinite values"):
        render(*layers[:3], layers[4], params)


def test_render_is_idempotent_byte_for_byte(tmp_path: Path) -> None:
    _small_layers(tmp_path, smooth_random_field(256, 256, amplitude=15.0, seed=9))
    params = RenderParams(mip=0, chunk_xy=128)
    outputs = []
    for _ in range(2):
        layers = prepare_render(str(tmp_path / "src"), str(tmp_path / "field"), str(tmp_path / "out"), None, params)
        render(*layers[:3], layers[4], params)
        outputs.append(sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").rglob("*") if p.is_file()))
    assert outputs[0] == outputs[1]


def _two_section_layers(tmp_path: Path) -> np.ndarray:
    """Sections 0 and 1 of the sample (1 with a black debris patch); section 1's field pulls from x+12."""
    images = np.stack([sample_section(0)[:256, :256], sample_section(1)[:256, :256]])
    images[1, 40:80, 60:100] = 0
    src = create_from_info(str(tmp_path / "src"), make_image_info(dtype="uint8", resolution=(4, 4, 50),
                           size=(256, 256, 2), chunk_xy=128), LayerKind.IMAGE)
    src.write(BBox((0, 0, 0), (256, 256, 2)), images[:, None])
    layer = create_layer(str(tmp_path / "field"), like=src, kind=LayerKind.FIELD, max_mip=0, chunk_xy=128)
    shifts = torch.cat([affine_field(256, 256, translation=(0.0, 0.0)), affine_field(256, 256, translation=(12.0, 0.0))])
    layer.write(BBox((0, 0, 0), (256, 256, 2)), shifts.numpy())
    return images


def _render_section(tmp_path: Path, z: int, name: str, fill_from: int | None = None) -> np.ndarray:
    params = RenderParams(mip=0, fill_holes_from=fill_from)
    region = BBox((0, 0, z), (256, 256, z + 1))
    layers = prepare_render(str(tmp_path / "src"), str(tmp_path / "field"), str(tmp_path / name), region, params)
    render(*layers[:3], layers[4], params)
    return open_layer(str(tmp_path / name), LayerKind.IMAGE).read(region)[0, 0]


def test_fill_holes_takes_black_pixels_from_the_section_before(tmp_path: Path) -> None:
    images = _two_section_layers(tmp_path)
    plain = _render_section(tmp_path, 1, "plain")
    first = _render_section(tmp_path, 0, "filled")
    filled = _render_section(tmp_path, 1, "filled", fill_from=0)
    holes = plain == 0
    assert holes[:, 244:].all() and holes[40:80, 48:88].all()  # the border the shift opens, the debris
    assert (filled[holes] == first[holes]).all() and (filled[holes] > 0).mean() > 0.99
    assert (filled[~holes] == plain[~holes]).all()  # rendered tissue is untouched
    assert (first == images[0]).all()


def test_fill_holes_refuses_an_unrendered_or_invalid_section(tmp_path: Path) -> None:
    _two_section_layers(tmp_path)
    with pytest.raises(InputError, match="section 0 of .* is not rendered .*missing chunk"):
        _render_section(tmp_path, 1, "out", fill_from=0)
    with pytest.raises(InputError, match="must be another section"):
        _render_section(tmp_path, 1, "out", fill_from=1)
    with pytest.raises(InputError, match="must be another section"):
        _render_section(tmp_path, 1, "out", fill_from=5)
    params = RenderParams(mip=0, fill_holes_from=0)
    with pytest.raises(InputError, match="one section at a time"):
        prepare_render(str(tmp_path / "src"), str(tmp_path / "field"), str(tmp_path / "out"), None, params)
