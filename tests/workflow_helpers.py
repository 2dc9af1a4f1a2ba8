"""Stacks of independently deformed copies of real sections, with their exact alignment fields."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seamless_core import synthetic
from seamless_core.cli import main
from seamless_core.errors import ExitCode

from conftest import sample_section
from test_steps import make_layer


@dataclass
class DeformedStack:
    path: Path
    originals: list[torch.Tensor]  # (1, 1, H, W) in [0, 1], per section
    truths: list[torch.Tensor]  # pull field that aligns the copy back onto its original (zeros for z=0)
    tissue: list[torch.Tensor]  # original-frame pixels to score (off the crack line and the debris)
    crack_band: list[torch.Tensor]


def deformed_stack(root: Path, sections: list[int], size: int, *, seed: int = 0, chunk: int = 128,
                   max_translation: float = 12.0, cracked: tuple[int, ...] | None = None,
                   debris: tuple[int, ...] | None = None) -> DeformedStack:
    """Section `sections[i]` of the sample, deformed independently for i > 0, as an image layer with MIPs 0-3.

    `cracked` / `debris` list the z that get a 5 px crack / a black debris patch (default: every z > 0).
    """
    originals, truths, tissue, bands, images = [], [], [], [], []
    for i, index in enumerate(sections):
        original = torch.from_numpy(sample_section(index)[:size, :size] / 255.0).float()[None, None]
        originals.append(original)
        if i == 0:
            images.append(original)
            truths.append(torch.zeros(1, 2, size, size))
            tissue.append(torch.ones(1, 1, size, size, dtype=torch.bool))
            bands.append(torch.zeros(1, 1, size, size, dtype=torch.bool))
            continue
        copy = synthetic.deformed_copy(original, seed=seed + 101 * i, max_translation=max_translation,
                                       crack_opening=5.0 if cracked is None or i in cracked else 0.0,
                                       debris_radius=size / 16 if debris is None or i in debris else 0.0)
        images.append(copy["deformed"])
        truths.append(copy["truth"])
        tissue.append(copy["tissue"])
        bands.append(copy["crack_band"])
    stack = torch.cat(images).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    path = root / "source"
    make_layer(path, stack, chunk=chunk, max_mip=3)
    assert main(["downsample", "--src", str(path), "--mip", "0", "--dst-mip", "3"]) == ExitCode.OK
    return DeformedStack(path, originals, truths, tissue, bands)


def endpoint_errors(estimate: np.ndarray, stack: DeformedStack, z: int, margin: int = 16) -> tuple[float, float]:
    """Median and p95 end-point error (px) of a final field against the truth, on tissue off the crack band."""
    est = torch.from_numpy(estimate).float()
    epe = (est - stack.truths[z]).norm(dim=1)[0]
    keep = stack.tissue[z][0, 0] & ~stack.crack_band[z][0, 0]
    keep[:margin] = keep[-margin:] = False
    keep[:, :margin] = keep[:, -margin:] = False
    values = epe[keep]
    return float(values.median()), float(values.quantile(0.95))
