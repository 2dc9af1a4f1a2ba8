"""compute_field throughput, chunk by chunk against --batch, on CPU or a GPU.

Why: the finetuner on one 256² chunk is kernel-launch bound on a GPU; stacking chunks (compute-field
--batch, seamless_core/estimators/batching.py) fills the device. A 2048² section (ISBI sections tiled,
/work/shared or ../shared) and a deformed copy (synthetic.deformed_copy of each tile's field is not
needed: one smooth misalignment of the whole section) are written as real file:// layers; the step runs
through the CLI for each (stages, batch) and the MIP-0 megapixels per second are printed, with the peak
GPU memory of the run where there is one.

Run: .venv/bin/python bench/compute_field_batch.py [--device cuda] [--size 2048] [--chunk 256]
     [--batches 1,4,16] [--stages exact,serial]
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seamless_core import fields, synthetic  # noqa: E402
from seamless_core.cli import main as seamless  # noqa: E402
from seamless_core.geometry import BBox  # noqa: E402
from seamless_core.volumes import LayerKind, create_from_info, make_image_info  # noqa: E402


def tiled_section(size: int) -> np.ndarray:
    paths = sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "isbi2012" / "*.png")))
    tiles = [np.asarray(Image.open(p)) for p in paths] or [np.random.default_rng(0).integers(1, 255, (512, 512), np.uint8)]
    n = size // 512
    rows = [np.concatenate([tiles[(r * n + c) % len(tiles)] for c in range(n)], axis=1) for r in range(n)]
    return np.concatenate(rows, axis=0)


def make_stack(root: Path, size: int) -> str:
    original = torch.from_numpy(tiled_section(size) / 255.0).float()[None, None]
    misalign = synthetic.section_misalignment(size, size, seed=5, max_translation=12.0, max_rotation_deg=0.5, elastic=3.0)
    deformed = fields.warp(original, misalign)
    data = torch.cat([original, deformed]).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
    info = make_image_info(dtype="uint8", resolution=(4, 4, 40), size=(size, size, 2), chunk_xy=256, max_mip=3,
                           kind=LayerKind.IMAGE)
    layer = create_from_info(str(root / "img"), info, LayerKind.IMAGE)
    layer.write(BBox((0, 0, 0), (size, size, 2)), data)
    assert seamless(["downsample", "--src", str(root / "img"), "--mip", "0", "--dst-mip", "3"]) == 0
    return str(root / "img")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--stages", default="exact,serial")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        img = make_stack(root, args.size)
        mpx = args.size * args.size / 1e6
        print(f"| stages | batch | s | MIP-0 Mpx/s | peak GPU MiB |  (device {args.device}, torch {torch.__version__}, "
              f"{args.size}² section, chunk {args.chunk})")
        print("|---|---:|---:|---:|---:|")
        for stages in args.stages.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                dst = root / f"f_{stages}_{batch}"
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                code = seamless(["compute-field", "--src", img, "--tgt", img, "--dst", str(dst), "--z", "1", "--tgt-z",
                                 "0", "--stages", stages, "--chunk", str(args.chunk), "--batch", str(batch),
                                 "--device", args.device])
                seconds = time.perf_counter() - start
                assert code == 0, code
                peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
                print(f"| {stages} | {batch} | {seconds:.2f} | {mpx / seconds:.2f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
