"""Where two serial chains part: per-section robustness and a montage of both aligned stacks.

bench/align_quality.py gives one robustness figure over the whole stack. This shows it section by
section (the deformed stack's chain against the published stack's chain, both aligned with the same
stages and K vote targets) and writes a montage (row 1: the deformed stack aligned; row 2: the
published stack aligned), because patch metrics alone hide a chain that morphs its sections:
docs/estimators.md ("Why no finetuner stage for real neighbours") was found this way.

Run: .venv/bin/python bench/chain_diagnosis.py [--sections 6] [--stages serial | JSON] [--k 3]
     [--vote-blur 2.0] [--montage chains.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as quality  # noqa: E402
from seamless_core.estimators.spec import PRESETS, parse_stages  # noqa: E402
from seamless_core.vote import vector_vote  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=6)
    parser.add_argument("--stages", default="serial", help="a preset name or a JSON stage list")
    parser.add_argument("--k", type=int, default=3, help="vote targets per section")
    parser.add_argument("--vote-blur", type=float, default=2.0, help="px over which the vote judges agreement")
    parser.add_argument("--montage", type=Path, help="write both aligned stacks side by side (PNG/JPEG)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = parse_stages(PRESETS[args.stages] if args.stages in PRESETS else json.loads(args.stages))
    quality.vector_vote = lambda c, temperature, blur_sigma: vector_vote(  # the bench's vote, blur as asked
        c, temperature=temperature, blur_sigma=args.vote_blur)
    stack = quality.load_stack(args.sections)
    deformed = quality.deformed_stack(stack)

    def estimate(moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return quality.field_seamless(moving, reference, spec)

    from_deformed, _ = quality.serial_align(deformed, estimate, args.k)
    from_published, _ = quality.serial_align(stack, estimate, args.k)
    print("| z | robustness median / p95 px | rejected | all patches median / p95 px |")
    print("|---|---|---|---|")
    measured, rejected_total, total = [], 0, 0
    for z in range(1, args.sections):
        shifts, rejected = quality.patch_shifts(from_deformed[z], from_published[z])
        every, _ = quality.patch_shifts(from_deformed[z], from_published[z], min_peak=0.0)
        measured.append(shifts)
        rejected_total += rejected
        total += rejected + shifts.size
        med, p95 = (np.median(shifts), np.percentile(shifts, 95)) if shifts.size else (np.nan, np.nan)
        print(f"| {z} | {med:.2f} / {p95:.2f} | {rejected / max(1, rejected + shifts.size):.0%} "
              f"| {np.median(every):.2f} / {np.percentile(every, 95):.2f} |")
    shifts = np.concatenate(measured)
    print(f"all sections: {np.median(shifts):.2f} / {np.percentile(shifts, 95):.2f} px, "
          f"{rejected_total / max(1, total):.0%} rejected")
    if args.montage:
        rows = [np.concatenate([s[z, 0].numpy() for z in range(args.sections)], 1)
                for s in (from_deformed, from_published)]
        pixels = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(args.montage)
        print(f"montage: {args.montage}")


if __name__ == "__main__":
    main()
