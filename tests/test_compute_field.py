"""compute_field through real layers: recovers a known deformation; bad stage specs and targets refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from seamless_core import fields, synthetic
from seamless_core.cli import main
from seamless_core.errors import ExitCode
from seamless_core.geometry import BBox
from seamless_core.volumes import LayerKind, open_layer

from conftest import sample_section
from test_steps import make_layer

SIZE = 256


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, object]:
    """Section 0 untouched and a deformed copy of it at z=1 (translation, rotation, elastic), as layers."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cf")
    original = torch.from_numpy(sample_section(5)[:SIZE, :SIZE] / 255.0).float()[None, None]
    known = synthetic.section_misalignment(SIZE, SIZE, seed=21, max_translation=12.0, max_rotation_deg=1.0, elastic=3.0)
    deformed = fields.warp(original, known)
    stack = torch.cat([original, deformed]).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    for name, data in (("img", stack), ("black", np.zeros_like(stack))):
        make_layer(root / name, data, chunk=64, max_mip=2)
        assert main(["downsample", "--src", str(root / name), "--mip", "0", "--dst-mip", "2"]) == ExitCode.OK
    truth = fields.invert(known.double(), iterations=300, tolerance=1e-7).float()
    return {"root": root, "truth": truth}


def test_compute_field_recovers_a_known_deformation_chunk_by_chunk(pair) -> None:
    root: Path = pair["root"]  # type: ignore[assignment]
    code = main(["compute-field", "--src", str(root / "img"), "--tgt", str(root / "img"), "--dst", str(root / "field"),
                 "--z", "1", "--tgt-z", "0", "--chunk", "128", "--pad", "32", "--report-json", str(root / "r.json")])
    assert code == ExitCode.OK
    report = json.loads((root / "r.json").read_text())
    assert [s["mip"] for s in report["stages"]] == [2, 1, 0]
    layer = open_layer(str(root / "field"), LayerKind.FIELD)
    assert layer.seamless_info["stages"]["stages"][0]["estimators"][0]["name"] == "block_matching"
    estimate = torch.from_numpy(layer.read(BBox((0, 0, 1), (SIZE, SIZE, 2))))
    epe = (estimate - pair["truth"]).norm(dim=1)[0, 24:-24, 24:-24]  # the border lacks content to match
    # four 128 px chunks per section at MIP 0: no seam may spoil the recovery
    assert float(epe.median()) < 0.15, float(epe.median())
    assert float(epe.quantile(0.95)) < 0.6, float(epe.quantile(0.95))
    # every stage's field is kept at its own MIP (a finer stage or a rerun starts from it)
    coarse = torch.from_numpy(layer.read(BBox((0, 0, 1), (SIZE // 4, SIZE // 4, 2), 2)))
    assert (coarse - fields.resample(pair["truth"], 0, 2)).norm(dim=1)[0, 6:-6, 6:-6].median() < 0.5


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ('[{"mip": 0, "estimators": [{"name": "finetuner"}]}, {"mip": 2, "estimators": [{"name": "finetuner"}]}]',
         "coarse to fine"),
        ('[{"mip": 2, "estimators": [{"name": "optical_flow"}]}]', "unknown estimator 'optical_flow'"),
        ('[{"mip": 2, "estimators": [{"name": "block_matching", "params": {"stride": 0}}]}]', "estimator block_matching: stride"),
        ('[{"mip": 2, "estimators": [{"name": "pyramid", "params": {"archive": "/nowhere/model"}}]}]', "/nowhere/model"),
        ('[{"mip": 2, "estimators": []}]', "estimators"),
        ("{not json", "cannot read --stages"),
    ],
)
def test_bad_stage_specs_are_refused_before_anything_is_written(pair, stages: str, message: str, capsys) -> None:
    root: Path = pair["root"]  # type: ignore[assignment]
    code = main(["compute-field", "--src", str(root / "img"), "--tgt", str(root / "img"), "--dst",
                 str(root / "refused"), "--z", "1", "--tgt-z", "0", "--stages", stages])
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_INPUT, err
    assert message in err and "Traceback" not in err
    assert not (root / "refused").exists()


def test_an_empty_target_section_is_refused_or_skipped_as_documented(pair, capsys) -> None:
    root: Path = pair["root"]  # type: ignore[assignment]
    args = ["compute-field", "--src", str(root / "img"), "--tgt", str(root / "black"), "--z", "1", "--tgt-z", "0",
            "--stages", '[{"mip": 1, "estimators": [{"name": "finetuner"}]}]']
    code = main([*args, "--dst", str(root / "empty")])
    assert code == ExitCode.INVALID_INPUT and "is empty (all black" in capsys.readouterr().err
    assert not (root / "empty" / "2_2_50").exists()  # nothing computed
    code = main([*args, "--dst", str(root / "kept"), "--on-empty-target", "init"])
    assert code == ExitCode.OK
    kept = open_layer(str(root / "kept"), LayerKind.FIELD).read(BBox((0, 0, 1), (SIZE // 2, SIZE // 2, 2), 1))
    assert not kept.any()  # no target: the (zero) initial field is kept, never a made-up one


def test_stage_presets_by_name() -> None:
    from seamless_core.cli import load_stages
    from seamless_core.errors import InputError
    from seamless_core.estimators.spec import parse_stages, preset

    assert load_stages("exact") == parse_stages(None)
    assert [s.mip for s in load_stages("serial").stages] == [2]
    with pytest.raises(InputError, match="unknown stage preset 'fast'"):
        preset("fast")


def _field(root: Path, name: str, *extra: str, mip: int = 0) -> torch.Tensor:
    code = main(["compute-field", "--src", str(root / "img"), "--tgt", str(root / "img"), "--dst", str(root / name),
                 "--z", "1", "--tgt-z", "0", "--chunk", "192", "--pad", "32", *extra])
    assert code == ExitCode.OK
    side = SIZE >> mip
    return torch.from_numpy(open_layer(str(root / name), LayerKind.FIELD).read(BBox((0, 0, 1), (side, side, 2), mip)))


def test_batched_chunks_give_the_fields_of_chunk_by_chunk(pair) -> None:
    """--batch stacks chunks of unequal size (192 px chunks of a 256 px section: 192 and 64 wide) on one call.

    Block matching treats batch members independently: equal to float rounding. The default stages'
    finetuner stops on the batch's mean loss: within a small fraction of a pixel, and as exact.
    """
    root: Path = pair["root"]  # type: ignore[assignment]
    bm = '[{"mip": 0, "estimators": [{"name": "block_matching"}]}]'
    single, batched = _field(root, "bm1", "--stages", bm), _field(root, "bm4", "--stages", bm, "--batch", "4")
    assert float((single - batched).abs().max()) < 1e-3
    single, batched = _field(root, "ex1"), _field(root, "ex9", "--batch", "9")
    diff = (single - batched).norm(dim=1)[0, 24:-24, 24:-24]
    assert float(diff.median()) < 0.05 and float(diff.quantile(0.95)) < 0.2, (float(diff.median()), float(diff.quantile(0.95)))
    epe = (batched - pair["truth"]).norm(dim=1)[0, 24:-24, 24:-24]
    assert float(epe.median()) < 0.15 and float(epe.quantile(0.95)) < 0.6


def test_batch_below_one_is_refused(pair, capsys) -> None:
    root: Path = pair["root"]  # type: ignore[assignment]
    code = main(["compute-field", "--src", str(root / "img"), "--tgt", str(root / "img"), "--dst", str(root / "b0"),
                 "--z", "1", "--tgt-z", "0", "--batch", "0"])
    assert code == ExitCode.USAGE
    assert "--batch" in capsys.readouterr().err
