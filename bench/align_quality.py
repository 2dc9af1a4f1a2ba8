"""Alignment quality on the real shared sample: robustness, neighbour correlation, drift; TV-L1 beside us.

The shared ssTEM sections are an already (imperfectly) aligned stack, 50 nm apart. A serial aligner that
follows the content drifts away from the published geometry, and one that makes neighbours identical
has overfit. So, as issue 3 asks, this measures:

(a) robustness: align the stack after deforming every section independently (section 0 untouched) and
    align the undeformed stack; both results should agree patchwise (phase correlation shifts);
(b) alignment: neighbour correlation at MIP 2 of the result relative to that of the published stack
    (between 0.95x and 1.3x; far above means neighbours were morphed into each other);
(c) drift: patchwise shift of the aligned (deformed) stack against the published geometry.

Serial alignment: section z is aligned onto the already aligned sections z-1..z-K (K = 3, fewer at the
start), the K fields are vector-voted, and z is rendered through the voted field.

Run: .venv/bin/python bench/align_quality.py [--sections 30] [--methods seamless,tvl1] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seamless_core import fields, synthetic  # noqa: E402
from seamless_core.estimators.multiscale import align_pair  # noqa: E402
from seamless_core.vote import vector_vote  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "isbi2012"
MARK = ("<!-- align-quality:start -->", "<!-- align-quality:end -->")


def load_stack(n: int) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(Image.open(SAMPLE / f"{z}.png")) / 255.0).float()
                        for z in range(n)])[:, None]


def deformed_stack(stack: torch.Tensor) -> torch.Tensor:
    out = [stack[0]]
    for z in range(1, stack.shape[0]):
        out.append(synthetic.deformed_copy(stack[z : z + 1], seed=1000 + z)["deformed"][0])
    return torch.stack(out)


def field_seamless(moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return align_pair(moving, reference)


def field_tvl1(moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    from skimage.registration import optical_flow_tvl1

    v, u = optical_flow_tvl1(reference[0, 0].numpy(), moving[0, 0].numpy())  # moving(p + (v, u)) ~ reference
    return torch.from_numpy(np.stack([u, v])[None].astype(np.float32))


def serial_align(stack: torch.Tensor, estimate, k_targets: int = 3) -> tuple[torch.Tensor, float]:
    aligned = [stack[0:1]]
    start = time.perf_counter()
    for z in range(1, stack.shape[0]):
        targets = [aligned[z - k] for k in range(1, min(k_targets, z) + 1)]
        candidates = torch.stack([estimate(stack[z : z + 1], t) for t in targets])
        if len(targets) >= 3:
            field, _ = vector_vote(candidates, temperature=1.0, blur_sigma=2.0)
        else:
            field = candidates[0]
        aligned.append(fields.warp(stack[z : z + 1], field))
    return torch.cat(aligned), time.perf_counter() - start


def patch_shifts(a: torch.Tensor, b: torch.Tensor, patch: int = 64, margin: int = 32) -> np.ndarray:
    """Phase-correlation shift magnitude (px) of b against a for tissue patches of one section."""
    from skimage.registration import phase_cross_correlation

    a_np, b_np = a[0].numpy(), b[0].numpy()
    shifts = []
    h, w = a_np.shape
    for y in range(margin, h - margin - patch + 1, patch):
        for x in range(margin, w - margin - patch + 1, patch):
            pa, pb = a_np[y : y + patch, x : x + patch], b_np[y : y + patch, x : x + patch]
            if (pa <= 0).mean() > 0.2 or (pb <= 0).mean() > 0.2:
                continue
            shift, _, _ = phase_cross_correlation(pa, pb, upsample_factor=10, normalization=None)
            shifts.append(float(np.hypot(*shift)))
    return np.array(shifts)


def neighbour_correlation(stack: torch.Tensor) -> float:
    """Mean Pearson r of consecutive sections at MIP 2 (4x average pooled), tissue in both only."""
    small = F.avg_pool2d(stack, 4)
    rs = []
    for z in range(1, small.shape[0]):
        a, b = small[z, 0], small[z - 1, 0]
        valid = (a > 0.02) & (b > 0.02)
        if valid.sum() < 100:
            continue
        rs.append(float(np.corrcoef(a[valid].numpy(), b[valid].numpy())[0, 1]))
    return float(np.mean(rs))


def evaluate(method: str, stack: torch.Tensor, deformed: torch.Tensor) -> dict[str, float]:
    estimate = {"seamless": field_seamless, "tvl1": field_tvl1}[method]
    from_deformed, seconds_a = serial_align(deformed, estimate)
    from_published, seconds_b = serial_align(stack, estimate)
    robust = np.concatenate([patch_shifts(from_deformed[z], from_published[z]) for z in range(1, stack.shape[0])])
    drift = [np.median(patch_shifts(from_deformed[z], stack[z])) for z in range(1, stack.shape[0])]
    published_nc = neighbour_correlation(stack)
    return {
        "robust_median_px": float(np.median(robust)),
        "robust_p95_px": float(np.percentile(robust, 95)),
        "neighbour_corr_ratio": neighbour_correlation(from_published) / published_nc,
        "neighbour_corr_ratio_deformed": neighbour_correlation(from_deformed) / published_nc,
        "drift_median_px": float(np.median(drift)),
        "drift_max_px": float(np.max(drift)),
        "seconds_per_section": (seconds_a + seconds_b) / (2 * (stack.shape[0] - 1)),
    }


def table(results: dict[str, dict[str, float]], n: int) -> str:
    rows = [
        f"Serial alignment of the first {n} shared sections (K = 3 vote targets), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| method | robustness median / p95 px (target ≤ 2 / ≤ 5) | neighbour corr. ratio, published stack (0.95–1.3) "
        "| same, deformed stack | drift median / max px | s per section |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        rows.append(
            f"| {name} | {r['robust_median_px']:.2f} / {r['robust_p95_px']:.2f} | {r['neighbour_corr_ratio']:.3f} "
            f"| {r['neighbour_corr_ratio_deformed']:.3f} | {r['drift_median_px']:.2f} / {r['drift_max_px']:.2f} "
            f"| {r['seconds_per_section']:.1f} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=30)
    parser.add_argument("--methods", default="seamless,tvl1")
    parser.add_argument("--out", type=Path, help="rewrite the align-quality section of this markdown file")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args()
    stack = load_stack(args.sections)
    deformed = deformed_stack(stack)
    results = {m: evaluate(m, stack, deformed) for m in args.methods.split(",")}
    text = table(results, args.sections)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.out:
        doc = args.out.read_text() if args.out.exists() else ""
        block = f"{MARK[0]}\n{text}\n{MARK[1]}"
        if MARK[0] in doc:
            doc = re.sub(re.escape(MARK[0]) + ".*?" + re.escape(MARK[1]), lambda _: block, doc, flags=re.S)
        else:
            doc += f"\n## Alignment quality on real neighbours\n\n{block}\n"
        args.out.write_text(doc)


if __name__ == "__main__":
    main()
