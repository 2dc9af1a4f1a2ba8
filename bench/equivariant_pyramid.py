"""A prototype: fine-tune the committed pyramid to be equivariant on true neighbour pairs.

docs/estimators.md traces the chains' divergence (issue 3 (a)) to steps that are not equivariant: the
field for a deformed section (or a deformed target) is not the plain section's field composed with that
deformation, wherever neighbours' content is ambiguous. A trained estimator can be asked for exactly
that property. Each step here adds, to the archive's own training loss (synthetic pairs, bench-free
`seamless_core.train.compute_loss`), three forward passes on a true neighbour pair (S = section z,
T = section z-1, same crop) with independent random deformations D_s, D_t of the training ranges:

  f_p = net(S, T),  f_s = net(D_s S, T),  f_t = net(S, D_t T)
  source equivariance: compose(f_s, d_s) = f_p      (warp(D_s S, f_s) = warp(S, f_p))
  target equivariance: f_t = compose(d_t, f_p)      (warp(S, f_t) = D_t T when warp(S, f_p) = T)

as end-point errors on the target's tissue, away from crack gaps and the crop's border, plus the
masked MSE of warp(S, f_p) against T and the smoothness term (as for the archive's neighbour pairs).

Run: .venv/bin/python bench/equivariant_pyramid.py --out /tmp/eq-pyramid [--steps 600] [--equivariance 1]
     then evaluate it as a stage: '[{"mip": 2, "estimators": [{"name": "block_matching"},
     {"name": "pyramid", "params": {"archive": "/tmp/eq-pyramid"}}]}]' in bench/pair_floor.py or
     bench/chain_diagnosis.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import align_quality as quality  # noqa: E402

from seamless_core import fields  # noqa: E402
from seamless_core.models import DEFAULT_ARCHIVE  # noqa: E402
from seamless_core.models.archive import load_archive, save_archive  # noqa: E402
from seamless_core.train import (PairSampler, _deformation, _dihedral, _epe, _lr_at, compute_loss, deform,  # noqa: E402
                                 masked_mse)

BORDER = 8  # px at the training MIP left out of the equivariance terms (fields there see padding)


def neighbour_batch(sampler: PairSampler, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    p, m = sampler.patch, sampler.margin
    inner = (slice(None), slice(None), slice(m, m + p), slice(m, m + p))
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("s", "t", "ds", "dt", "fs", "ft", "ok_s", "ok_t")}
    for _ in range(batch):
        z = int(torch.randint(1, sampler.stack.shape[0], (), generator=g))
        x0 = int(torch.randint(0, sampler.w - p + 1, (), generator=g))
        y0 = int(torch.randint(0, sampler.h - p + 1, (), generator=g))
        k = int(torch.randint(0, 8, (), generator=g))
        s, t = _dihedral(sampler._window(z, x0, y0), k), _dihedral(sampler._window(z - 1, x0, y0), k)
        ds, fs, ok_s = deform(s, *_deformation(s.shape[-1], g, sampler.deform))
        dt, ft, ok_t = deform(t, *_deformation(t.shape[-1], g, sampler.deform))
        for key, value in (("s", s), ("t", t), ("ds", ds), ("dt", dt), ("fs", fs), ("ft", ft),
                           ("ok_s", ok_s), ("ok_t", ok_t)):
            rows[key].append(value[inner])
    return {k: torch.cat(v) for k, v in rows.items()}


def equivariance_loss(model, nb: dict[str, torch.Tensor], smoothness: float, mse_weight: float = 1.0
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    n = nb["s"].shape[0]
    out = model(torch.cat([nb["s"], nb["ds"], nb["s"]]), torch.cat([nb["t"], nb["t"], nb["dt"]]))
    f_p, f_s, f_t = out[:n], out[n : 2 * n], out[2 * n :]
    h, w = f_p.shape[-2:]
    inside = torch.zeros(1, 1, h, w, dtype=torch.bool)
    inside[..., BORDER:-BORDER, BORDER:-BORDER] = True
    w_s = (inside & (nb["t"] > 0) & nb["ok_s"]).float()
    w_t = (inside & (nb["dt"] > 0) & nb["ok_t"]).float()
    source = _epe(fields.compose(f_s, nb["fs"]), f_p, w_s)
    target = _epe(f_t, fields.compose(nb["ft"], f_p), w_t)
    mse, _ = masked_mse(nb["s"], nb["t"], f_p)
    loss = source + target + mse_weight * mse + smoothness * fields.smoothness(f_p)
    return loss, {"eq_source": source.item(), "eq_target": target.item(), "nb_mse": mse.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=96)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--equivariance", type=float, default=1.0, help="weight of the neighbour terms")
    parser.add_argument("--smoothness", type=float, default=1.0)
    parser.add_argument("--neighbour-mse", type=float, default=1.0,
                        help="weight of the neighbours' image term (lower: less pull towards the neighbour's anatomy)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)  # field inversion across cracks (masked in the loss)
    loaded = load_archive(DEFAULT_ARCHIVE)
    model = loaded.model.train().requires_grad_(True)  # loaded for inference
    mip = loaded.mip or 2
    sections = F.avg_pool2d(quality.load_stack(30), 2**mip)
    sampler = PairSampler(sections, args.patch, neighbour_fraction=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr)
        synthetic, stats = compute_loss(model, sampler.sample(args.batch, g), args.smoothness, 1.0)
        neighbours, nstats = equivariance_loss(model, neighbour_batch(sampler, args.batch // 2, g), args.smoothness,
                                              args.neighbour_mse)
        loss = synthetic + args.equivariance * neighbours
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: epe {stats.get('epe', float('nan')):.3f} px, "
                  + ", ".join(f"{k} {v:.3f}" for k, v in nstats.items())
                  + f", {time.perf_counter() - start:.0f} s", flush=True)
    training = {"command": " ".join(sys.argv), "base": str(DEFAULT_ARCHIVE), "prototype": "bench/equivariant_pyramid.py",
                **{k: v for k, v in vars(args).items() if k != "out"}, "seconds": time.perf_counter() - start}
    save_archive(args.out, model.eval(), loaded.config, json.loads(json.dumps(training, default=str)), mip=mip)
    print(f"archive: {args.out}")


if __name__ == "__main__":
    main()
