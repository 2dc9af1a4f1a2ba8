"""The whole workflow on the real shared sample: robustness, neighbour correlation, drift, seams in z.

Issue 4's real-section acceptance, measured end to end through `seamless align` (blocks, vote,
stitching, compose with decay, final render), with the metrics of bench/align_quality.py:

* the 30 shared sections, each deformed independently (section 0 untouched; a debris patch and a crack
  per section, synthetic.deformed_copy) and, separately, the undeformed published stack, both aligned
  by the workflow with block size 10 (two stitches);
* robustness: patchwise phase-correlation shifts between the two aligned results (target median <= 2,
  p95 <= 5 px); neighbour correlation at MIP 2 relative to the published stack (0.95x - 1.3x); drift of
  the aligned published stack against the published geometry;
* no seam in z: per-section robustness median of the sections right after a block boundary, against
  1.5x the median of the others;
* blocks buy parallelism, not error: the same deformed stack with one block (no stitching) and with
  block size 5, residual within 20 %; the residual measured against the block-10 published alignment
  and against the published stack aligned with the same block size (which leaves out how the published
  stack's own alignment differs between block sizes);
* the same block-10 pair with `blocks.fill_targets: false`, to show what filled targets buy;
* the share of the final fields' pixels that fold (their compose steps' reports), published and deformed;
* the final fields' rigid part (largest turn and centre shift) and their bend beyond it, from the same reports;
* CPU wall time of each run;
* how much one draw says: the chains are chaotic, so the deformed stack is also drawn with other seed
  bases (`--draws`), and block 10's robustness and the block sizes' comparison are given per draw and
  as the mean over the draws. The first draw (seed base 1000) is the acceptance draw of every other row.

Run: .venv/bin/python bench/workflow_quality.py [--sections 30] [--stages serial] [--workers 2] [--draws 4]
     [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from align_quality import (DRAW, MIN_PEAK, deformed_stack, every_patch_shifts, load_stack,  # noqa: E402
                           neighbour_correlation, passing_shifts)
from report import write_section  # noqa: E402
from seamless_core.cli import main as seamless  # noqa: E402
from seamless_core.geometry import BBox  # noqa: E402
from seamless_core.report import read_compose_reports, read_drift, read_folds  # noqa: E402
from seamless_core.volumes import LayerKind, create_from_info, make_image_info, open_layer  # noqa: E402

PROJECT = """\
source: {source}
destination: {destination}
sections: {{start: 0, stop: {stop}}}
stages: {stages}
vote: {{k: 3}}
blocks: {{size: {block}, decay_dist: 100, fill_targets: {fill}}}
cpc: {{mip: 2, patch: 32}}
"""


def write_stack(path: Path, stack: torch.Tensor) -> str:
    """A (Z, 1, H, W) stack in [0, 1] as a uint8 image layer with MIPs 0-3."""
    depth, _, height, width = stack.shape
    info = make_image_info(dtype="uint8", resolution=(4, 4, 50), size=(width, height, depth), chunk_xy=256, max_mip=3)
    layer = create_from_info(str(path), info, LayerKind.IMAGE)
    data = stack.mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    layer.write(BBox((0, 0, 0), (width, height, depth)), data)
    assert seamless(["downsample", "--src", str(path), "--mip", "0", "--dst-mip", "3"]) == 0
    return str(path)


def align(root: Path, name: str, source: str, depth: int, block: int, stages: str, workers: int,
          fill: bool = True) -> tuple[torch.Tensor, float]:
    project = root / f"{name}.yaml"
    project.write_text(PROJECT.format(source=source, destination=root / name, stop=depth, stages=stages, block=block,
                                      fill=str(fill).lower()))
    started = time.monotonic()
    assert seamless(["align", str(project), "--workers", str(workers), "--no-report"]) == 0, name
    seconds = time.monotonic() - started
    image = open_layer(str(root / name / "image"), LayerKind.IMAGE)
    bounds = image.bounds(0)
    data = image.read(bounds)
    return torch.from_numpy(data.astype(np.float32) / 255.0), seconds


def final_field_figures(destination: Path, sections: int) -> dict[str, tuple[float, ...]]:
    """From a run's compose steps' reports (read once): "folds", the mean and largest share of its final
    fields' pixels that fold; "drift", their largest turn (degrees, by magnitude), largest centre shift
    (MIP-0 px) and median bend (px RMS; steps/drift.py)."""
    reports = read_compose_reports(f"file://{destination}", range(sections))
    shares = list(read_folds(reports).values())
    drift = read_drift(reports)
    bends = [d.bend_px for d in drift.values() if d.bend_px is not None]
    nan = float("nan")
    return {
        "folds": (float(np.mean(shares)), float(np.max(shares))) if shares else (nan, nan),
        "drift": (max((d.rotation_deg for d in drift.values()), key=abs), max(d.shift_px for d in drift.values()),
                  float(np.median(bends)) if bends else nan) if drift else (nan, nan, nan),
    }


def shifts_per_section(a: torch.Tensor, b: torch.Tensor) -> list[np.ndarray]:
    return passing_shifts(a, b)[0]


def summary(per_section: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([s for s in per_section if s.size])
    return float(np.median(values)), float(np.percentile(values, 95))


def figures(run: dict) -> dict:
    """A deformed run's robustness median / p95 against the block-10 published run, and (`own`) against the
    published run of its own block size."""
    median, p95 = summary(run["per_section"])
    return {"median_px": median, "p95_px": p95, "own": summary(run["own"]), "rejected": run["rejected"],
            "every": run["every"]}


def deformed_runs(root: Path, name: str, deformed: torch.Tensor, published_runs: dict, sections: int, stages: str,
                  workers: int) -> dict[int, dict]:
    """The deformed stack aligned with each block size, measured against the block-10 published run and
    against the published run of the same block size."""
    src_def = write_stack(root / name, deformed)
    aligned_pub = published_runs[10][0]
    runs = {}
    for block in published_runs:
        aligned, seconds = align(root, f"aligned_{name}_b{block}", src_def, sections, block, stages, workers)
        per_section, rejected = passing_shifts(aligned, aligned_pub)
        # against the same block size's published run (block 10's is the one above)
        own = per_section if block == 10 else shifts_per_section(aligned, published_runs[block][0])
        runs[block] = {"per_section": per_section, "own": own, "seconds": seconds, "aligned": aligned,
                       "rejected": rejected, "every": summary(every_patch_shifts(aligned, aligned_pub))}
    return runs


def run(sections: int, stages: str, workers: int, draws: int = 1) -> dict[str, object]:
    torch.manual_seed(0)
    published = load_stack(sections)
    root = Path(tempfile.mkdtemp(prefix="workflow-quality-"))
    try:
        src_pub = write_stack(root / "published", published)
        published_runs = {block: align(root, f"aligned_published_b{block}", src_pub, sections, block, stages, workers)
                          for block in (10, sections, 5)}
        aligned_pub, t_pub = published_runs[10]
        draw_runs = {}
        for i in range(draws):
            seed_base = DRAW * (i + 1)
            draw_runs[seed_base] = deformed_runs(root, f"deformed_{seed_base}", deformed_stack(published, seed_base),
                                                 published_runs, sections, stages, workers)
        runs = draw_runs[DRAW]
        src_def = str(root / f"deformed_{DRAW}")
        unfilled_pub, _ = align(root, "aligned_published_unfilled", src_pub, sections, 10, stages, workers, fill=False)
        unfilled, _ = align(root, "aligned_deformed_unfilled", src_def, sections, 10, stages, workers, fill=False)
        base = runs[10]
        robust_median, robust_p95 = summary(base["per_section"])
        medians = np.array([float(np.median(s)) if s.size else np.nan for s in base["per_section"]])
        after_boundary = [z for z in range(1, sections) if z - 1 in range(10, sections, 10)]  # s_b + 1
        others = [z for z in range(1, sections) if z not in after_boundary]
        drift = [float(np.median(s)) for s in shifts_per_section(published, aligned_pub) if s.size]
        nc_pub = neighbour_correlation(published[:, None] if published.dim() == 3 else published)
        final = {"published": final_field_figures(root / "aligned_published_b10", sections),
                 "deformed": final_field_figures(root / f"aligned_deformed_{DRAW}_b10", sections)}
        return {
            "sections": sections, "stages": stages, "workers": workers,
            "robust_median_px": robust_median, "robust_p95_px": robust_p95,
            "neighbour_corr_ratio_published": neighbour_correlation(aligned_pub[:, :1]) / nc_pub,
            "neighbour_corr_ratio_deformed": neighbour_correlation(base["aligned"][:, :1]) / nc_pub,
            "drift_median_px": float(np.median(drift)), "drift_max_px": float(np.max(drift)),
            "after_boundary_medians_px": {z: float(medians[z - 1]) for z in after_boundary},
            "others_median_px": float(np.nanmedian(medians[[z - 1 for z in others]])),
            "blocks": {b: {**figures(r), "seconds": r["seconds"]} for b, r in runs.items()},
            "unfilled_px": summary(shifts_per_section(unfilled, unfilled_pub)),
            "seconds_published": t_pub,
            "folds": {stack: figures["folds"] for stack, figures in final.items()},
            "field_drift": {stack: figures["drift"] for stack, figures in final.items()},
            "draws": {seed: {b: figures(r) for b, r in dr.items()} for seed, dr in draw_runs.items()},
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def table(r: dict) -> str:
    blocks = r["blocks"]
    ref = blocks[10]
    rows = [
        f"`seamless align` of the first {r['sections']} shared sections, stages `{r['stages']}`, k = 3, "
        f"{r['workers']} workers on this 2-core machine, torch {torch.__version__}. Shifts as in the "
        "align-quality section (phase correlation of 128 px patches).",
        "",
        "| measurement | figure | target |",
        "|---|---|---|",
        f"| robustness (deformed vs published stack, both aligned, block 10) median / p95 | "
        f"{r['robust_median_px']:.2f} / {r['robust_p95_px']:.2f} px | ≤ 2 / ≤ 5 px |",
        f"| the same: share of tissue patches whose phase-correlation peak is below {MIN_PEAK} (not in the figure "
        f"above); every tissue patch, median / p95 | {100 * ref['rejected']:.0f} %; "
        f"{ref['every'][0]:.2f} / {ref['every'][1]:.2f} px | reported |",
        f"| neighbour correlation ratio, published / deformed stack aligned | "
        f"{r['neighbour_corr_ratio_published']:.3f} / {r['neighbour_corr_ratio_deformed']:.3f} | 0.95–1.3 |",
        f"| drift of the aligned published stack vs its published geometry, median / max per section | "
        f"{r['drift_median_px']:.2f} / {r['drift_max_px']:.2f} px | reported |",
        "| sections right after a block boundary, robustness median | "
        + ", ".join(f"z={z}: {v:.2f}" for z, v in r["after_boundary_medians_px"].items())
        + f" px (others' median {r['others_median_px']:.2f} px) | ≤ 1.5 × others |",
    ]
    for block, figures in blocks.items():
        ratio = (figures["median_px"] / ref["median_px"], figures["p95_px"] / ref["p95_px"])
        own, ref_own = figures["own"], ref["own"]
        rows.append(f"| block size {block}: robustness median / p95 against the block-10 published run, ratio to "
                    f"block 10 | {figures['median_px']:.2f} / {figures['p95_px']:.2f} px ({ratio[0]:.2f}× / "
                    f"{ratio[1]:.2f}×) | within 20 % |")
        rows.append(f"| block size {block}: robustness median / p95 against the published run of the same block "
                    f"size, ratio to block 10; wall time | {own[0]:.2f} / {own[1]:.2f} px ({own[0] / ref_own[0]:.2f}× / "
                    f"{own[1] / ref_own[1]:.2f}×); {figures['seconds']:.0f} s | within 20 % |")
    rows.append(f"| block size 10 with `blocks.fill_targets: false` (holes of the targets left black): robustness "
                f"median / p95 | {r['unfilled_px'][0]:.2f} / {r['unfilled_px'][1]:.2f} px | (for comparison) |")
    rows.append("| final fields that fold (Jacobian determinant ≤ 0; docs/estimators.md, \"Folds\"), share of their "
                "pixels per section, mean / most: published; deformed stack (block 10) | "
                + "; ".join(f"{100 * mean:.1f} / {100 * most:.1f} %" for mean, most in r["folds"].values())
                + " | reported |")
    rows.append("| final fields' rigid part and bend (their compose steps' reports; docs/estimators.md, \"Drift\"): "
                "largest turn, largest shift of a section's centre, median bend (RMS beyond the rigid part): "
                "published; deformed stack (block 10) | "
                + "; ".join(f"{turn:+.2f}°, {shift:.1f} px, {bend:.1f} px" for turn, shift, bend in r["field_drift"].values())
                + " | reported |")
    rows.append(f"| wall time, published stack (block 10) | {r['seconds_published']:.0f} s | recorded |")
    draws = r["draws"]
    if len(draws) > 1:
        seeds = " / ".join(str(seed) for seed in draws)
        rows.append(f"| block 10 robustness median / p95 per draw (seed bases {seeds}) | "
                    + "; ".join(f"{d[10]['median_px']:.2f} / {d[10]['p95_px']:.2f}" for d in draws.values())
                    + " px | ≤ 2 / ≤ 5 px |")
        rows.append(f"| block 10 per draw: share of tissue patches rejected by the peak test; every tissue patch, "
                    f"median / p95 | "
                    + "; ".join(f"{100 * d[10]['rejected']:.0f} %, {d[10]['every'][0]:.2f} / {d[10]['every'][1]:.2f}"
                                for d in draws.values())
                    + " px | reported |")
        for against, pick in (("the block-10 published run", lambda f: (f["median_px"], f["p95_px"])),
                              ("the published run of the same block size", lambda f: f["own"])):
            mean = {b: tuple(float(np.mean([pick(d[b])[i] for d in draws.values()])) for i in (0, 1)) for b in blocks}
            for block, (median, p95) in mean.items():
                rows.append(f"| block size {block}, mean over the {len(draws)} draws: robustness median / p95 against "
                            f"{against}, ratio to block 10 | {median:.2f} / {p95:.2f} px "
                            f"({median / mean[10][0]:.2f}× / {p95 / mean[10][1]:.2f}×) | within 20 % |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=30)
    parser.add_argument("--stages", default="serial", help="stage preset (serial, exact)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="rewrite the workflow-quality section of this markdown file")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    parser.add_argument("--draws", type=int, default=4,
                        help=f"deformation draws (seed bases {DRAW}, {2 * DRAW}, ...): each adds the three block-size runs")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error(f"--draws must be at least 1, got {args.draws}")
    results = run(args.sections, args.stages, args.workers, args.draws)
    text = table(results)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if args.out:
        write_section(args.out, "workflow-quality", "Workflow quality on real sections", text)


if __name__ == "__main__":
    main()
