"""Where two serial chains part: per-section robustness and a montage of both aligned stacks.

bench/align_quality.py gives one robustness figure over the whole stack. This shows it section by
section (the deformed stack's chain against the published stack's chain, both aligned with the same
stages and K vote targets) and writes a montage (row 1: the deformed stack aligned; row 2: the
published stack aligned), because patch metrics alone hide a chain that morphs its sections:
docs/estimators.md ("Why no finetuner stage for real neighbours") was found this way.

--chain picks how a section's field is made:
  rendered: estimate section z against the already aligned (rendered) sections z-1..z-K, vote (the
            workflow's way, bench/align_quality.py's serial_align);
  compose:  estimate raw z against raw z-k once (reproducible: the per-section deformation telescopes),
            then F_z = vote over k of compose(F_{z-k}, P_{z,k}); --median W replaces each F_z by its
            W x W median at MIP 2 (keeps steps such as a crack, removes bumps narrower than W/2 there);
  filled:   as rendered, but each target's missing pixels (black borders, crack gaps, debris) are
            filled from the target before it (the output sections stay as rendered);
  template: estimate section z against one target, the mean of the aligned sections z-1..z-K (each
            pixel over the sections with tissue there): a running template, whose anatomy is averaged
            out, instead of a vote over single neighbours.
  affine:   as filled, but each target is the section rendered through the affine part of its voted
            field (Cauchy-weighted least squares), plus --median W's median of the rest when W > 1; the
            output keeps the whole field. Regional wrong matches then never reach a target (a prototype).
  solve:    every field solved at once from links to the K previous sections (bench/link_solve.py).
  decay:    as compose with K = 1, but only the affine part of F_{z-1} is carried exactly, its local rest
            decayed by --decay per section (a prototype).
--deform switches parts of the test's deformation off (crack, debris, elastic, rotation) or rounds the
translations to whole MIP-2 pixels, to see which part a chain fails on. --self-shift is the
--deform that leaves only translations of whole MIP-2 pixels up to 8 px (SELF_SHIFT): the published stack
against itself moved exactly, so an aligner whose output depends only on the content gives the same
images twice (docs/estimators.md, "The chain against itself").
--unfold all smooths every estimate and voted field where it folds (bench/fold_repair.py); --unfold output
only the voted field each section is rendered through, its targets stay as estimated (rendered and filled
chains). --tear-free F keeps block matching's largest tear-free set of patches. The last lines also give
the share of the voted fields' pixels that fold (docs/estimators.md, "Folds").
The table gives, per section, the patches that pass the peak test and all patches (peak >= 0); the
last lines give the neighbour-correlation ratios of both chains (bench/align_quality.py's metric).

Run: .venv/bin/python bench/chain_diagnosis.py [--sections 6] [--stages serial | JSON [+interiorB] [+soft] [+jitter] [+lk]] [--k 3]
     [--vote-blur 2.0] [--vote-temperature 1.0] [--vote softmin|median|mean]
     [--chain rendered|filled|compose|template|affine|solve|decay] [--median 0] [--decay 0.8] [--margin 32]
     [--montage chains.png] [--seed-base 1000] [--deform crack_opening=0,... | --self-shift] [--unfold none|all|output]
     [--tear-free 0.8]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as quality  # noqa: E402
import fold_repair  # noqa: E402
import link_solve  # noqa: E402
import pair_floor  # noqa: E402

from seamless_core import fields  # noqa: E402
from seamless_core.vote import vector_vote  # noqa: E402

#: --self-shift: synthetic.deformed_copy reduced to whole MIP-2-pixel translations of at most 8 px at MIP 0.
SELF_SHIFT = "crack_opening=0,debris_radius=0,elastic=0,max_rotation_deg=0,max_translation=8,translation_step=4"


def median_at_mip(field: torch.Tensor, window: int, mip: int = 2) -> torch.Tensor:
    """The field's window x window median at `mip` (edges replicated), back at MIP 0."""
    if window <= 1:
        return field
    small = fields.resample(field, 0, mip)
    half = window // 2
    patches = F.pad(small, (half, half, half, half), mode="replicate").unfold(2, window, 1).unfold(3, window, 1)
    return fields.resample(patches.reshape(*patches.shape[:4], -1).median(-1).values, mip, 0)


def median_vote(candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-component median of K >= 3 candidates (K, N, 2, H, W), and their largest spread (a prototype)."""
    spread = (candidates - candidates.mean(0)).norm(dim=2).amax(0)[:, None]
    return candidates.median(0).values, spread


def compose_align(stack: torch.Tensor, estimate, k_targets: int, median: int, carry=None) -> torch.Tensor:
    """Raw-to-raw fields composed along the stack (see --chain compose), each F_z median-filtered.

    carry(F_{z-k}, raw z-k) -> the field composed with P_{z,k} in F_{z-k}'s place (--chain decay)."""
    chain = [torch.zeros(1, 2, *stack.shape[-2:])]
    for z in range(1, stack.shape[0]):
        offsets = range(1, min(k_targets, z) + 1)
        carried = [chain[z - k] if carry is None else carry(chain[z - k], stack[z - k : z - k + 1])
                   for k in offsets]
        candidates = torch.stack([fields.compose(c, estimate(stack[z : z + 1], stack[z - k : z - k + 1]))
                                  for c, k in zip(carried, offsets)])
        voted, _ = quality.vector_vote(candidates, temperature=1.0, blur_sigma=2.0)  # 1-2 candidates: their mean
        chain.append(median_at_mip(voted, median))
    return torch.cat([fields.warp(stack[z : z + 1], chain[z]) for z in range(stack.shape[0])])


def decayed_carry(decay: float):
    """compose_align's carry for --chain decay: F's affine part (Cauchy-weighted fit over the pixels where
    it lands on tissue, see affine_part) kept whole, the local rest multiplied by `decay`. The rigid part of
    every section's correction is then carried exactly, as in --chain compose, while its local part
    (elastic warp, crack, and the content's own flow) fades over about 1 / (1 - decay) sections instead of
    accumulating (a prototype). Section z's output still uses its whole F_z."""
    def carry(field: torch.Tensor, section: torch.Tensor) -> torch.Tensor:
        affine = affine_part(field, fields.warp(section, field)[0, 0] > 0)
        return affine + decay * (field - affine)
    return carry


def template_align(stack: torch.Tensor, estimate, depth: int) -> torch.Tensor:
    """Each section aligned onto the tissue-weighted mean of the `depth` aligned sections before it."""
    aligned = [stack[0:1]]
    for z in range(1, stack.shape[0]):
        previous = torch.cat(aligned[max(0, z - depth) : z])
        weight = (previous > 0).float()
        template = (previous * weight).sum(0, keepdim=True) / weight.sum(0, keepdim=True).clamp_min(1e-6)
        aligned.append(fields.warp(stack[z : z + 1], estimate(stack[z : z + 1], template)))
    return torch.cat(aligned)


def affine_part(field: torch.Tensor, valid: torch.Tensor, step: int = 8, scale: float = 2.0,
                passes: int = 8) -> torch.Tensor:
    """The dense affine field closest to `field` over the `valid` pixels: least squares reweighted by
    Cauchy weights of `scale` px, so that regions of wrong matches do not pull it (a prototype)."""
    h, w = field.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    design = torch.stack([xs, ys, torch.ones_like(xs)], -1)  # (H, W, 3)
    pick = valid[::step, ::step]
    a = design[::step, ::step][pick]
    u = field[0].permute(1, 2, 0).double()[::step, ::step][pick]
    weights = torch.ones(a.shape[0], dtype=torch.float64)
    for _ in range(passes):
        root = weights.sqrt()[:, None]
        beta = torch.linalg.lstsq(a * root, u * root).solution
        residual = (u - a @ beta).norm(dim=1)
        weights = 1.0 / (1.0 + (residual / scale) ** 2)
    return (design @ beta).permute(2, 0, 1)[None].float()


def affine_targets(window: int):
    """serial_align's target_field for --chain affine: the voted field's affine part (fitted where the
    section and its first target have tissue) plus the window x window median of the rest at MIP 2."""
    def target_field(field: torch.Tensor, aligned: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        affine = affine_part(field, (aligned[0, 0] > 0) & (target[0, 0] > 0))
        return affine + median_at_mip(field - affine, window)
    return target_field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=6)
    parser.add_argument("--stages", default="serial", help="a preset name or a JSON stage list, '+interiorB', '+soft', '+jitter', '+lk' (pair_floor.py)")
    parser.add_argument("--k", type=int, default=3, help="vote targets per section (--chain template: sections averaged into the template)")
    parser.add_argument("--vote-blur", type=float, default=2.0, help="px over which the vote judges agreement")
    parser.add_argument("--vote-temperature", type=float, default=1.0, help="px: the vote's softmin temperature")
    parser.add_argument("--vote", choices=["softmin", "median", "mean"], default="softmin",
                        help="SEAMLeSS's softmin over majority subsets, the per-component median of the "
                        "candidates (continuous in them: no subset switching), or their plain mean")
    parser.add_argument("--decay", type=float, default=0.8,
                        help="--chain decay: the share of the carried field's local part kept per section")
    parser.add_argument("--chain",
                        choices=["rendered", "filled", "compose", "template", "affine", "solve", "decay"],
                        default="rendered",
                        help="align to rendered sections (with their holes filled), compose raw-to-raw fields, "
                        "align to a running template of the last K aligned sections, or to targets rendered "
                        "through their field's affine part (see above)")
    parser.add_argument("--median", type=int, default=0, help="--chain compose: median window at MIP 2 (0 = none); --chain affine: the targets' "
                        "field is the affine part plus this median of the rest")
    parser.add_argument("--margin", type=int, default=32,
                        help="px left out at the section's edges by the patch metric (128: the central 256 px only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--montage", type=Path, help="write both aligned stacks side by side (PNG/JPEG)")
    parser.add_argument("--seed-base", type=int, default=quality.DRAW,
                        help="deformation draw: section z is deformed with seed SEED_BASE + z (the recorded figures: "
                        f"{quality.DRAW}); other draws show how much one draw says")
    parser.add_argument("--self-shift", action="store_true",
                        help="the published stack against itself moved by whole MIP-2 pixels (no deformation)")
    parser.add_argument("--deform", default="",
                        help="overrides of the test's deformation, key=value,... with keys "
                        f"{', '.join(quality.DEFORMATION_KEYS)} (e.g. crack_opening=0,debris_radius=0,"
                        "elastic=0,max_rotation_deg=0: translations only; translation_step=4: whole pixels "
                        "at MIP 2)")
    parser.add_argument("--unfold", choices=["none", "all", "output"], default="none",
                        help="smooth fields where they fold: every estimate and vote, or only the field each section "
                        "is rendered through (its targets keep the estimate; rendered and filled chains)")
    parser.add_argument("--tear-free", type=float, default=0.0,
                        help="block matching keeps its largest set of patches linked where neighbouring vectors differ "
                        "by less than this x stride (0: off)")
    args = parser.parse_args()
    if args.self_shift and args.deform:
        parser.error("--self-shift moves the published stack and deforms nothing: leave out --deform")
    try:
        deformation = quality.parse_deformation(SELF_SHIFT if args.self_shift else args.deform)
    except ValueError as error:
        parser.error(str(error))
    if args.unfold == "output" and args.chain not in ("rendered", "filled"):
        parser.error("--unfold output needs --chain rendered or filled (their targets are rendered separately)")
    torch.set_num_threads(args.threads)
    estimate = pair_floor.estimator(args.stages)
    if args.unfold == "all":
        estimated = estimate
        estimate = lambda moving, reference: fold_repair.unfold(estimated(moving, reference))  # noqa: E731
    voted_folds: list[float] = []
    torn_votes: list[torch.Tensor] = []  # --unfold output: the voted field before the repair, for the targets

    def vote(c: torch.Tensor, temperature: float, blur_sigma: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The bench's vote, as asked; repaired where it folds with --unfold; its folded share recorded."""
        field, spread = (median_vote(c) if args.vote == "median" and c.shape[0] >= 3
                         else (c.mean(0), None) if args.vote == "mean"
                         else vector_vote(c, temperature=args.vote_temperature, blur_sigma=args.vote_blur))
        if args.unfold == "output":
            torn_votes.append(field)
        if args.unfold != "none":
            field = fold_repair.unfold(field)
        voted_folds.append(float((fields.jacobian_determinant(fields.resample(field, 0, 2)) <= 0).float().mean()))
        return field, spread

    quality.vector_vote = vote
    torn_targets = (lambda field, aligned, target: torn_votes.pop() if torn_votes else field) \
        if args.unfold == "output" else None
    stack = quality.load_stack(args.sections)
    deformed = quality.deformed_stack(stack, args.seed_base, **deformation)

    chains = {
        "rendered": lambda s: quality.serial_align(s, estimate, args.k, target_field=torn_targets)[0],
        "compose": lambda s: compose_align(s, estimate, args.k, args.median),
        "decay": lambda s: compose_align(s, estimate, 1, 0, carry=decayed_carry(args.decay)),
        "template": lambda s: template_align(s, estimate, args.k),
        "filled": lambda s: quality.serial_align(s, estimate, args.k, fill_targets=True, target_field=torn_targets)[0],
        "solve": lambda s: link_solve.solve_align(s, estimate, args.k, args.stages),
        "affine": lambda s: quality.serial_align(s, estimate, args.k, fill_targets=True,
                                                 target_field=affine_targets(args.median))[0],
    }
    with fold_repair.tear_free(args.tear_free) if args.tear_free > 0 else contextlib.nullcontext():
        from_deformed, from_published = chains[args.chain](deformed), chains[args.chain](stack)
    print("| z | robustness median / p95 px | rejected | all patches median / p95 px |")
    print("|---|---|---|---|")
    measured, rejected_total, total = [], 0, 0
    for z in range(1, args.sections):
        shifts, rejected = quality.patch_shifts(from_deformed[z], from_published[z], margin=args.margin)
        every, _ = quality.patch_shifts(from_deformed[z], from_published[z], min_peak=0.0, margin=args.margin)
        measured.append(shifts)
        rejected_total += rejected
        total += rejected + shifts.size
        med, p95 = (np.median(shifts), np.percentile(shifts, 95)) if shifts.size else (np.nan, np.nan)
        print(f"| {z} | {med:.2f} / {p95:.2f} | {rejected / max(1, rejected + shifts.size):.0%} "
              f"| {np.median(every):.2f} / {np.percentile(every, 95):.2f} |")
    shifts = np.concatenate(measured)
    print(f"all sections: {np.median(shifts):.2f} / {np.percentile(shifts, 95):.2f} px, "
          f"{rejected_total / max(1, total):.0%} rejected")
    published_nc = quality.neighbour_correlation(stack)
    print(f"neighbour correlation ratio: published stack aligned "
          f"{quality.neighbour_correlation(from_published) / published_nc:.3f}, deformed stack aligned "
          f"{quality.neighbour_correlation(from_deformed) / published_nc:.3f}")
    if voted_folds:
        print(f"voted fields fold on {100 * np.mean(voted_folds):.2f} % of their MIP-2 pixels (mean), "
              f"{100 * np.max(voted_folds):.1f} % at most")
    if args.montage:
        rows = [np.concatenate([s[z, 0].numpy() for z in range(args.sections)], 1)
                for s in (from_deformed, from_published)]
        pixels = (np.clip(np.concatenate(rows, 0), 0, 1) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(args.montage)
        print(f"montage: {args.montage}")


if __name__ == "__main__":
    main()
