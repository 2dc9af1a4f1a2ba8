"""Block size against robustness and neighbour correlation, end to end through `seamless align`.

bench/workflow_quality.py compares block sizes 5, 10 and 30 on robustness alone. This bench sweeps the
block size and gives, per size, both sides of issue 3's real-neighbour test, because they move in
opposite directions: a block starts from its first section as imaged and reaches the previous blocks
only through composition (gain 1), while within a block every section is aligned to rendered targets,
which amplify a difference (docs/estimators.md, "How much one draw says"). Small blocks are therefore
more reproducible, but a block of 2 is a chain of raw-to-raw fields composed, which aligns every pair of
neighbours in full and lifts the neighbour correlation above (b)'s 1.3 x.

Per block size: the published stack aligned once, the deformed stack (bench/align_quality.py's draws,
seed bases 1000, 2000, ...) aligned per draw, and against the published run of the same block size:
robustness median / p95 over the patches that pass the peak test (mean over the draws), the share of
patches rejected and the every-patch median / p95 (range over the draws), the neighbour-correlation
ratio of the published run and of the deformed runs (range), and the wall time of the published run.

Run: .venv/bin/python bench/block_sizes.py [--blocks 2,3,4,5,10] [--draws 4] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align_quality import (DRAW, deformed_stack, every_patch_shifts, load_stack,  # noqa: E402
                           neighbour_correlation, passing_shifts)
from report import write_section  # noqa: E402
from workflow_quality import align, summary, write_stack  # noqa: E402

SECTIONS = 30


def sweep(blocks: list[int], draws: int, workers: int) -> dict[int, dict]:
    """Per block size: {"published": (ratio, seconds), "draws": [per-draw figures]}."""
    published = load_stack(SECTIONS)
    published_nc = neighbour_correlation(published)
    root = Path(tempfile.mkdtemp(prefix="block-sizes-"))
    try:
        src_pub = write_stack(root / "published", published)
        sources = {}
        results: dict[int, dict] = {}
        for block in blocks:
            aligned_pub, seconds = align(root, f"published_b{block}", src_pub, SECTIONS, block, "serial", workers)
            per_draw = []
            for i in range(draws):
                seed_base = DRAW * (i + 1)
                if seed_base not in sources:
                    sources[seed_base] = write_stack(root / f"deformed_{seed_base}", deformed_stack(published, seed_base))
                aligned, _ = align(root, f"deformed_{seed_base}_b{block}", sources[seed_base], SECTIONS, block,
                                   "serial", workers)
                per_section, rejected = passing_shifts(aligned, aligned_pub)
                per_draw.append({"passing": summary(per_section), "rejected": rejected,
                                 "every": summary(every_patch_shifts(aligned, aligned_pub)),
                                 "ratio": neighbour_correlation(aligned[:, :1]) / published_nc})
                print(f"block {block}, draw {seed_base}: {per_draw[-1]}", flush=True)
            results[block] = {"published": (neighbour_correlation(aligned_pub[:, :1]) / published_nc, seconds),
                              "draws": per_draw}
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def span(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    low, high = min(values) * scale, max(values) * scale
    return f"{low:.{digits}f}–{high:.{digits}f}" if f"{low:.{digits}f}" != f"{high:.{digits}f}" else f"{low:.{digits}f}"


def table(results: dict[int, dict], draws: int) -> str:
    rows = [
        (f"`seamless align` of the first {SECTIONS} shared sections, stages `serial`, k = 3, filled block targets, "
         f"{draws} draws of the deformation, each against the published stack aligned with the same block size; "
         f"torch {torch.__version__}."),
        "",
        ("| block size | robustness median / p95 px (mean over draws) | rejected | every patch median / p95 px | "
         "ratio published / deformed | wall time (published) |"),
        "|---|---|---|---|---|---|",
    ]
    for block, r in results.items():
        d = r["draws"]
        median = float(np.mean([x["passing"][0] for x in d]))
        p95 = float(np.mean([x["passing"][1] for x in d]))
        rows.append(
            f"| {block} | {median:.2f} / {p95:.2f} | {span([x['rejected'] for x in d], 100, 0)} % | "
            f"{span([x['every'][0] for x in d], digits=1)} / {span([x['every'][1] for x in d], digits=1)} | "
            f"{r['published'][0]:.3f} / {span([x['ratio'] for x in d], digits=3)} | {r['published'][1]:.0f} s |")
    rows.append("")
    rows.append("Targets (issue 3): robustness ≤ 2 / ≤ 5 px; ratio 0.95–1.3.")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", default="2,3,4,5,10", help="block sizes, comma-separated, each at least 2")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="rewrite the block-sizes section of this markdown file")
    args = parser.parse_args()
    try:
        blocks = [int(b) for b in args.blocks.split(",")]
    except ValueError:
        parser.error(f"--blocks must be comma-separated integers, got {args.blocks!r}")
    if any(b < 2 for b in blocks) or args.draws < 1:
        parser.error("every block size must be at least 2 and --draws at least 1")
    text = table(sweep(blocks, args.draws, args.workers), args.draws)
    print(text)
    if args.out:
        write_section(args.out, "block-sizes", "Block size: robustness against neighbour correlation", text)


if __name__ == "__main__":
    main()
