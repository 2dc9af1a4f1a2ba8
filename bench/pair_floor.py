"""One step of a serial chain, measured: the per-step robustness floor and the morph of a stage spec.

A serial aligner's robustness error (bench/align_quality.py) starts as the error of one step and then
accumulates along the chain. This isolates that step: section z is aligned onto its raw predecessor
z-1 twice, once as published and once independently deformed (synthetic.deformed_copy, the
align-quality deformation); both results sit in the frame of the same target, so their patchwise shift
(align_quality's phase correlation, every tissue patch) is the estimator's own non-reproducibility —
the floor a chain adds at every step. Patches that cross the synthetic crack are counted apart.

"Pair morph" is how far one step raises the neighbour correlation (align_quality's metric, MIP 2) of
the pair over the published pair: near 1 for an aligner of an already aligned stack, about 2.5 for one
that morphs a section into its neighbour. docs/estimators.md tabulates both for the stage specs tried.

Run: .venv/bin/python bench/pair_floor.py [--sections 1,3,5,7] NAME=SPEC [NAME=SPEC ...]
     (SPEC: a preset name, e.g. serial or exact, or a JSON stage list; "+jitter" after it runs block
     matching jittered, bench/jitter.py's prototype, and "+soft" (before any "+jitter") with continuous patch
     weights, bench/soft_matching.py's, and "+interiorB" without the patches within B px of the frame's border,
     bench/border_patches.py's; "+lk" then refines each field with bench/patch_lk.py's;
     "+smoothS" last projects the field onto a cubic B-spline with knots S px apart, bench/smooth_projection.py's
     prototype, and "+smoothS+refitN" re-estimates around that spline N more times)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as quality  # noqa: E402
import border_patches  # noqa: E402
import jitter  # noqa: E402
import soft_matching  # noqa: E402
import patch_lk  # noqa: E402
import smooth_projection  # noqa: E402

from seamless_core import fields, synthetic  # noqa: E402
from seamless_core.estimators.spec import PRESETS, parse_stages  # noqa: E402


def crack_gap(z: int, size: int) -> np.ndarray:
    """Where deformed_copy's crack opened in section z (the seed it uses), original frame to ~5 px."""
    return synthetic.crack_field(size, size, opening=5.0, seed=1000 + z + 11)[1][0, 0].numpy()


def estimator(spec_text: str):
    """(moving, reference) -> field for a preset name or a JSON stage list; "+lk" refines the field with
    bench/patch_lk.py, "+jitter" runs block matching jittered (bench/jitter.py), "+soft" with continuous patch weights
    (bench/soft_matching.py), "+interiorB" without the patches within B px of the border (bench/border_patches.py),
    "+smoothS[+refitN]"
    projects it onto a spline (bench/smooth_projection.py); all three are prototypes, see there."""
    base, _, spacing = spec_text.partition("+smooth")
    spec_text = base if spacing else spec_text
    base, lk = (spec_text[: -len("+lk")], True) if spec_text.endswith("+lk") else (spec_text, False)
    base, jittered = (base[: -len("+jitter")], True) if base.endswith("+jitter") else (base, False)
    base, soft = (base[: -len("+soft")], True) if base.endswith("+soft") else (base, False)
    base, _, interior = base.partition("+interior")
    spec = parse_stages(PRESETS[base] if base in PRESETS else json.loads(base))

    def estimate(moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        with (jitter.jittered_block_matching() if jittered else contextlib.nullcontext(),
              soft_matching.soft_block_matching() if soft else contextlib.nullcontext(),
              border_patches.interior_block_matching(float(interior)) if interior else contextlib.nullcontext()):
            field = quality.field_seamless(moving, reference, spec)
        field = patch_lk.refine(moving, reference, field) if lk else field
        if not spacing:
            return field
        grid, _, passes = spacing.partition("+refit")
        smooth = smooth_projection.project(field, moving, reference, spacing=float(grid))
        for _ in range(int(passes or 0)):  # re-estimate around the spline: the prior then pulls towards it
            residual = quality.field_seamless(fields.warp(moving, smooth), reference, spec)
            smooth = smooth_projection.project(fields.compose(residual, smooth), moving, reference, spacing=float(grid))
        return smooth

    return estimate


def measure(spec_text: str, stack: torch.Tensor, sections: list[int]) -> dict[str, float]:
    estimate = estimator(spec_text)
    on_crack, off_crack, morph = [], [], []
    start = time.perf_counter()
    for z in sections:
        target = stack[z - 1 : z]
        deformed = synthetic.deformed_copy(stack[z : z + 1], seed=1000 + z)["deformed"]
        a = fields.warp(deformed, estimate(deformed, target))[0, 0].numpy()
        aligned = fields.warp(stack[z : z + 1], estimate(stack[z : z + 1], target))
        morph.append(quality.neighbour_correlation(torch.cat([target, aligned]))
                     / quality.neighbour_correlation(stack[z - 1 : z + 1]))
        b, gap = aligned[0, 0].numpy(), crack_gap(z, stack.shape[-1])
        p, m = quality.PATCH, 32
        for y in range(m, b.shape[0] - m - p + 1, quality.STEP):
            for x in range(m, b.shape[1] - m - p + 1, quality.STEP):
                pa, pb = a[y : y + p, x : x + p], b[y : y + p, x : x + p]
                if (pa <= 0).mean() > 0.2 or (pb <= 0).mean() > 0.2:
                    continue
                dy, dx, _ = quality._phase_correlation(pa, pb)
                (on_crack if gap[y : y + p, x : x + p].any() else off_crack).append(float(np.hypot(dy, dx)))
    every = np.array(on_crack + off_crack)
    on, off = np.array(on_crack), np.array(off_crack)
    return {"median": float(np.median(every)), "p95": float(np.percentile(every, 95)),
            "off_crack_median": float(np.median(off)), "off_crack_p95": float(np.percentile(off, 95)),
            "crack_median": float(np.median(on)), "crack_p95": float(np.percentile(on, 95)),
            "pair_morph": float(np.mean(morph)), "seconds_per_pair": (time.perf_counter() - start) / (2 * len(sections))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="NAME=SPEC: a preset name or a JSON stage list")
    parser.add_argument("--sections", default="1,3,5,7", help="sections z aligned onto z-1 (comma-separated)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = [int(z) for z in args.sections.split(",")]
    stack = quality.load_stack(max(sections) + 1)
    print("| stages | floor median / p95 px | off the crack | crossing the crack | pair morph | s per pair |")
    print("|---|---|---|---|---|---|")
    for item in args.specs:
        name, _, spec_text = item.partition("=")
        r = measure(spec_text or name, stack, sections)
        print(f"| {name} | {r['median']:.2f} / {r['p95']:.2f} | {r['off_crack_median']:.2f} / {r['off_crack_p95']:.2f} "
              f"| {r['crack_median']:.2f} / {r['crack_p95']:.2f} | {r['pair_morph']:.3f} | {r['seconds_per_pair']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
