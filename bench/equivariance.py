"""Is an estimator equivariant? The field it gives for a deformed source, against the ideal one.

If an estimator's field for (source, target) is F, then for (source deformed by a known field g,
target) it should be compose(F, g^-1): the two warped results are then the same image. A serial chain
adds this estimator error at every step (bench/pair_floor.py measures it through the images, with the
crack and debris of the robustness test; this measures it on the field itself, for one clean
deformation at a time). Cases: a fractional translation (5.3, -2.7) px, a 1 degree rotation and a
3 px elastic warp; content: the real neighbour (section z onto z - 1) or the same content (section
z - 1 warped by a smooth 3 px field onto itself), which shows the estimator's own floor. Figures are
per pixel over the section less 64 px at each edge (median / p95, px at MIP 0), sections 1, 3, 5, 7.

A SPEC ending in "+lk" is refined by bench/patch_lk.py (a per-patch affine Lucas-Kanade prototype).

Run: .venv/bin/python bench/equivariance.py [--content neighbour,same] NAME=SPEC [NAME=SPEC ...]
     (SPEC: a preset name, e.g. serial or exact, or a JSON stage list, optionally with "+lk")
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as quality  # noqa: E402
import pair_floor  # noqa: E402

from seamless_core import fields, synthetic  # noqa: E402

SIZE, EDGE = 512, 64


def deformations() -> dict[str, torch.Tensor]:
    return {
        "translation (5.3, -2.7)": synthetic.affine_field(SIZE, SIZE, translation=(5.3, -2.7)),
        "rotation 1 deg": synthetic.affine_field(SIZE, SIZE, rotation_deg=1.0),
        "elastic 3 px": synthetic.smooth_random_field(SIZE, SIZE, amplitude=3.0, seed=5),
    }


def measure(estimate, stack: torch.Tensor, content: str, sections: list[int],
            cases: list[tuple[torch.Tensor, torch.Tensor]]) -> list[str]:
    """Median / p95 per case (deformation, its inverse); the plain field is estimated once per section."""
    errors: list[list[np.ndarray]] = [[] for _ in cases]
    for z in sections:
        target = stack[z - 1 : z]
        source = (stack[z : z + 1] if content == "neighbour" else
                  fields.warp(target, synthetic.smooth_random_field(SIZE, SIZE, amplitude=3.0, seed=z)))
        plain = estimate(source, target)
        for found, (deformation, inverse) in zip(errors, cases):
            deformed = estimate(fields.warp(source, deformation), target)
            error = (deformed - fields.compose(plain, inverse)).norm(dim=1)[0, EDGE:-EDGE, EDGE:-EDGE]
            found.append(error.numpy().ravel())
    every = [np.concatenate(found) for found in errors]
    return [f"{np.median(e):.2f} / {np.percentile(e, 95):.2f}" for e in every]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("specs", nargs="+", help="NAME=SPEC: a preset name or a JSON stage list, '+lk' to refine")
    parser.add_argument("--content", default="neighbour,same", help="neighbour and/or same (comma-separated)")
    parser.add_argument("--sections", default="1,3,5,7")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = [int(z) for z in args.sections.split(",")]
    stack = quality.load_stack(max(sections) + 1)
    named = deformations()
    cases = [(d, fields.invert(d.double(), iterations=300, tolerance=1e-6).float()) for d in named.values()]
    print("| stages | content | " + " | ".join(named) + " |")
    print("|---|---|" + "---|" * len(named))
    for item in args.specs:
        name, _, spec_text = item.partition("=")
        estimate = pair_floor.estimator(spec_text or name)
        for content in args.content.split(","):
            print(f"| {name} | {content} | " + " | ".join(measure(estimate, stack, content, sections, cases)) + " |", flush=True)


if __name__ == "__main__":
    main()
