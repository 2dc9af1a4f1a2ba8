"""Where a serial chain's error comes from, step by step: the step's own error or the target's.

Two K = 1 chains are run side by side, as in bench/chain_diagnosis.py: the published sections, and
independently deformed copies (seed 1000 + z, as bench/align_quality.py). At step z the deformed
section D_z is aligned twice: onto the deformed chain's previous result (what the chain does) and
onto the published chain's previous result (the same target as the published step). The ideal field
is the published step's field composed with the known inverse deformation, so per pixel:
  own       = |field onto the published target - ideal|   (the estimator's non-equivariance),
  inherited = |field onto the deformed target - field onto the published target| (what the target's
              difference does to the step; a chain that only carries its error forward keeps this
              near the previous step's total),
  total     = |field onto the deformed target - ideal|     (the two rendered sections differ by it).
Median / p95 / mean over the section less `--edge` px, px at MIP 0.

--fill fills each target's missing pixels from the target before (the outputs stay as rendered), as
bench/chain_diagnosis.py --chain filled does.

--clean measures the chain without missing content: central 384 px crops of sections deformed whole
(translation, rotation, elastic warp; no crack, no debris), so no black borders enter the chain.

Run: .venv/bin/python bench/chain_fields.py [--sections 8] [--stages serial | JSON [+lk]] [--clean] [--fill]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as quality  # noqa: E402
import pair_floor  # noqa: E402

from seamless_core import fields, synthetic  # noqa: E402

SIZE, CROP = 512, slice(64, 448)


def deformed_section(section: torch.Tensor, z: int, clean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(deformed copy, its truth field: warp(copy, truth) ~ section), both in the measured frame."""
    if not clean:
        copy = synthetic.deformed_copy(section, seed=1000 + z)
        return copy["deformed"], copy["truth"]
    misalignment = synthetic.section_misalignment(SIZE, SIZE, seed=1000 + z, max_translation=20.0,
                                                  max_rotation_deg=1.0, elastic=3.0)
    truth = fields.invert(misalignment.double(), iterations=300, tolerance=1e-6).float()
    # a crop shifts both frames by the same 64 px, so the pull field's values are unchanged
    return fields.warp(section, misalignment)[..., CROP, CROP], truth[..., CROP, CROP]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=8)
    parser.add_argument("--stages", default="serial", help="a preset name or a JSON stage list, '+lk' to refine")
    parser.add_argument("--clean", action="store_true", help="central crops, no crack, debris or black borders")
    parser.add_argument("--fill", action="store_true",
                        help="fill each target's missing pixels from the target before (chain_diagnosis --chain filled)")
    parser.add_argument("--edge", type=int, default=64, help="px left out at each edge")
    args = parser.parse_args()
    torch.set_num_threads(1)
    estimate = pair_floor.estimator(args.stages)
    full = quality.load_stack(args.sections)
    stack = full[..., CROP, CROP] if args.clean else full
    e = args.edge

    def stats(error: torch.Tensor) -> str:
        v = error[0, e:-e, e:-e].flatten()
        return f"{v.median():.2f} / {v.quantile(0.95):.2f} / {v.mean():.2f}"

    published, deformed = stack[0:1], stack[0:1]
    print("| z | own median / p95 / mean px | inherited | total |")
    print("|---|---|---|---|")
    for z in range(1, args.sections):
        copy, truth = deformed_section(full[z : z + 1], z, args.clean)
        step = estimate(stack[z : z + 1], published)
        ideal = fields.compose(step, truth)
        onto_published, onto_deformed = estimate(copy, published), estimate(copy, deformed)
        print(f"| {z} | {stats((onto_published - ideal).norm(dim=1))} "
              f"| {stats((onto_deformed - onto_published).norm(dim=1))} "
              f"| {stats((onto_deformed - ideal).norm(dim=1))} |", flush=True)
        rendered_published, rendered_deformed = fields.warp(stack[z : z + 1], step), fields.warp(copy, onto_deformed)
        if args.fill:  # the next targets: missing pixels taken from the target before
            published = quality.fill_missing(rendered_published, published)
            deformed = quality.fill_missing(rendered_deformed, deformed)
        else:
            published, deformed = rendered_published, rendered_deformed


if __name__ == "__main__":
    main()
