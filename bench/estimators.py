"""Speed and exact-recovery quality of each estimator and of the default stage stack, with TV-L1 beside them.

For shared sections z, a deformed copy with a known field (synthetic.deformed_copy: translation <= 20 px,
rotation <= 1 deg, 3 px elastic, a 5 px crack, a debris patch) is aligned back onto the original. Each
row reports the end-point error against the truth on tissue off the crack band (median / p95, px), p95
inside the crack band, and throughput in megapixels per second of MIP-0 target area (the unit a user
scales by) on this machine's CPU (or --device cuda).

Run: .venv/bin/python bench/estimators.py [--sections 0,5,11,21,24] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from report import write_section  # noqa: E402
from seamless_core import synthetic  # noqa: E402
from seamless_core.estimators.multiscale import align_pair  # noqa: E402

SAMPLE = ROOT.parent / "shared" / "data" / "isbi2012"

METHODS: dict[str, list[dict] | None] = {
    "block matching @ MIP 2 alone": [{"mip": 2, "estimators": [{"name": "block_matching"}]}],
    "learned pyramid @ MIP 2 alone": [{"mip": 2, "estimators": [{"name": "pyramid"}]}],
    "block matching @ 2, finetuner @ 1": [{"mip": 2, "estimators": [{"name": "block_matching"}]},
                                          {"mip": 1, "estimators": [{"name": "finetuner"}]}],
    "default: block matching @ 2, finetuner @ 1, @ 0": None,
    "block matching + finetuner @ 2, finetuner @ 1": [
        {"mip": 2, "estimators": [{"name": "block_matching"}, {"name": "finetuner"}]},
        {"mip": 1, "estimators": [{"name": "finetuner"}]}],
    "pyramid @ 2, finetuner @ 1, @ 0": [{"mip": 2, "estimators": [{"name": "pyramid"}]},
                                        {"mip": 1, "estimators": [{"name": "finetuner"}]},
                                        {"mip": 0, "estimators": [{"name": "finetuner"}]}],
}


def tvl1(moving: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    from skimage.registration import optical_flow_tvl1

    v, u = optical_flow_tvl1(reference[0, 0].cpu().numpy(), moving[0, 0].cpu().numpy())  # CPU only
    return torch.from_numpy(np.stack([u, v])[None].astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default="0,5,11,21,24")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: per-pair CPU cost)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sections = [int(z) for z in args.sections.split(",")]
    device = torch.device(args.device)
    cases = []
    for z in sections:
        image = torch.from_numpy(np.asarray(Image.open(SAMPLE / f"{z}.png")) / 255.0).float()[None, None]
        cases.append((image, synthetic.deformed_copy(image, seed=z)))
    rows = []
    runners = {name: (lambda s, t, spec=spec: align_pair(s, t, spec, device=device).cpu()) for name, spec in METHODS.items()}
    runners["scikit-image TV-L1 (outside reference)"] = tvl1
    for name, run in runners.items():
        run(cases[0][1]["deformed"].to(device), cases[0][0].to(device))  # warm-up: model load, caches
        off, band, seconds = [], [], 0.0
        for image, d in cases:
            start = time.perf_counter()
            estimate = run(d["deformed"].to(device), image.to(device))
            seconds += time.perf_counter() - start
            epe = (estimate - d["truth"]).norm(dim=1, keepdim=True)
            off.append(epe[d["tissue"] & ~d["crack_band"]])
            band.append(epe[d["tissue"] & d["crack_band"]])
        off_all, band_all = torch.cat(off), torch.cat(band)
        mpx = sum(c[0].numel() for c in cases) / 1e6
        rows.append(f"| {name} | {off_all.median():.3f} / {off_all.quantile(0.95):.3f} | {band_all.quantile(0.95):.2f} "
                    f"| {seconds / len(cases):.2f} | {mpx / seconds:.3f} |")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"Sections {sections} of the shared sample (512 x 512), device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Acceptance (default stages): median <= 0.1, p95 <= 0.5, crack band p95 <= 2.",
        "",
        "| method | EPE off crack, median / p95 px | crack band p95 px | s per pair | MIP-0 Mpx/s |",
        "|---|---|---|---|---|",
        *rows,
    ])
    print(text)
    if args.out:
        write_section(args.out, "estimators", "Estimators: exact recovery and speed", text)


if __name__ == "__main__":
    main()
