"""Self-supervised training of the SEAMLeSS pyramid on sections of a CloudVolume image layer.

Every step draws a batch of section pairs from the sections z in [z0, z1) at one MIP:

* **synthetic pairs** (the majority): a random `patch` px crop of a real section (randomly flipped or
  transposed) and a copy of it deformed by a random field whose truth is known: translation,
  rotation, smooth elastic warp, sometimes an open crack and a black debris blob. Which of the two is
  the source is random, so the network sees both the sharp and the resampled image on either side.
* **true neighbour pairs** (z against z-1, a fraction `NEIGHBOUR_FRACTION` of the batch): the source
  section is deformed by a random field too, but the truth is unknown (neighbours really differ), so
  only the unsupervised terms apply.

Loss = masked MSE between warp(src, field) and tgt over tissue pixels (both images normalised on their
tissue; pixels whose source sample touches black are excluded) + `smoothness` x fields.smoothness(field),
plus, for synthetic pairs only, a **supervised end-point-error term** against the known field (weight
`epe_weight`, on the final field and, at a quarter weight, on each coarser level's field upsampled).

Checkpoints (model, optimizer, step, RNG states) go to `<out_archive>.ckpt/step-NNNNNNN.pt` every
`checkpoint_every` steps and at the end; `resume=True` continues from the newest one and reproduces
the uninterrupted run exactly (same weights, bit for bit, on CPU). The archive is written at the end.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import shlex
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import fields, synthetic
from .devices import resolve_device
from .errors import InputError
from .estimators.pyramid import ARCHITECTURE, PyramidConfig, PyramidNet, count_parameters, normalise
from .geometry import BBox
from .models.archive import resolve_archive_path, save_archive

log = logging.getLogger("seamless.train")

NEIGHBOUR_FRACTION = 0.25
MAX_PRELOAD_PIXELS = 2**28  # sections are read into memory once; beyond this use a coarser MIP or fewer z
KEEP_CHECKPOINTS = 3
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Deformations:
    """Ranges of the random synthetic deformations, in pixels of the training MIP."""

    max_translation: float = 8.0  # per axis, uniform
    max_rotation_deg: float = 2.0
    max_elastic: float = 1.5  # peak displacement of the smooth elastic part
    elastic_wavelength: tuple[float, float] = (24.0, 64.0)
    crack_probability: float = 0.3
    crack_opening: tuple[float, float] = (0.5, 2.0)
    debris_probability: float = 0.3
    debris_radius: tuple[float, float] = (3.0, 8.0)

    @property
    def margin(self) -> int:
        """Context read around a crop so that displaced content comes from real pixels."""
        return int(math.ceil(self.max_translation + self.max_elastic + self.crack_opening[1])) + 4


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
def load_sections(src_layer_path: str, z_range: tuple[int, int], mip: int) -> torch.Tensor:
    """All sections z0..z1-1 at `mip` as (Z, 1, H, W) float32 in [0, 1]; 0 = no tissue."""
    from .volumes import LayerKind, open_layer

    z0, z1 = (int(v) for v in z_range)
    if z1 <= z0:
        raise InputError(f"z range {z0}:{z1} is empty: the stop must be greater than the start")
    layer = open_layer(src_layer_path, LayerKind.IMAGE, role="--src")
    bounds = layer.bounds(mip)
    if z0 < bounds.start[2] or z1 > bounds.stop[2]:
        raise InputError(f"z range {z0}:{z1} is outside the sections of {layer.path} "
                         f"({bounds.start[2]}:{bounds.stop[2]})")
    box = BBox((bounds.start[0], bounds.start[1], z0), (bounds.stop[0], bounds.stop[1], z1), mip)
    sx, sy, sz = box.size
    if sx * sy * sz > MAX_PRELOAD_PIXELS:
        raise InputError(f"{sz} sections of {sx}x{sy} px at MIP {mip} are too many pixels to load for training "
                         f"({sx * sy * sz / 1e6:.0f} Mpx > {MAX_PRELOAD_PIXELS / 1e6:.0f}); use a coarser --mip "
                         "or a shorter --z range")
    data = layer.read(box)
    arr = torch.from_numpy(np.ascontiguousarray(data)).float()
    if data.dtype == np.uint8:
        arr = arr / 255.0
    return arr.clamp_(0.0, 1.0)


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=g))


def _dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """One of the 8 flips/rotations of (..., H, W) square images (applied before any field exists)."""
    if k & 4:
        x = x.transpose(-1, -2)
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    return x


def _intensity(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random contrast, brightness, gamma and noise on tissue pixels; black stays black."""
    tissue = img > 0
    out = img.clamp_min(1e-4) ** _uniform(g, 0.8, 1.25)
    out = (out - 0.5) * _uniform(g, 0.8, 1.2) + 0.5 + _uniform(g, -0.08, 0.08)
    out = out + 0.02 * torch.randn(img.shape, generator=g)
    return torch.where(tissue, out.clamp(1.0 / 255, 1.0), torch.zeros_like(out))


def _deformation(size: int, g: torch.Generator, d: Deformations) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(global field, crack field or None) of one sample, (1, 2, size, size)."""
    glob = synthetic.affine_field(size, size,
                                  translation=(_uniform(g, -1, 1) * d.max_translation,
                                               _uniform(g, -1, 1) * d.max_translation),
                                  rotation_deg=_uniform(g, -1, 1) * d.max_rotation_deg)
    amp = _uniform(g, 0.0, d.max_elastic)
    if amp > 0.05:
        glob = glob + synthetic.smooth_random_field(size, size, amplitude=amp,
                                                    wavelength=_uniform(g, *d.elastic_wavelength), seed=_seed(g))
    crack = None
    if _uniform(g, 0, 1) < d.crack_probability:
        crack = synthetic.crack_field(size, size, opening=_uniform(g, *d.crack_opening), seed=_seed(g))
    return glob, crack


def deform(image: torch.Tensor, glob: torch.Tensor, crack: tuple[torch.Tensor, torch.Tensor] | None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(deformed image, its pull field from `image`, True off the crack's gap in the deformed frame)."""
    if crack is None:
        return fields.warp(image, glob), glob, torch.ones_like(image, dtype=torch.bool)
    crack_f, gap = crack
    cracked = fields.warp(image, crack_f).masked_fill(gap, 0.0)
    # = warp(image, total) off the crack's gap
    return fields.warp(cracked, glob), fields.compose(glob, crack_f), ~fields.warp_mask(gap, glob)


@dataclass
class Batch:
    src: torch.Tensor  # (B, 1, P, P)
    tgt: torch.Tensor
    truth: torch.Tensor  # (B, 2, P, P); zeros where unknown
    truth_valid: torch.Tensor  # (B, 1, P, P) bool; all False for neighbour pairs


class PairSampler:
    """Draws training batches from preloaded sections; every random choice comes from one generator."""

    def __init__(self, sections: torch.Tensor, patch: int, deformations: Deformations = Deformations(),
                 neighbour_fraction: float = NEIGHBOUR_FRACTION) -> None:
        self.deform = deformations
        self.patch = patch
        self.margin = deformations.margin
        z, _, h, w = sections.shape
        # pad so that any patch lies inside and its context window never leaves the tensor
        ph, pw = max(0, patch - h), max(0, patch - w)
        m = self.margin
        self.stack = F.pad(sections, (m, m + pw, m, m + ph))
        self.h, self.w = h + ph, w + pw
        self.neighbour_fraction = neighbour_fraction if z > 1 else 0.0

    def _window(self, z: int, x0: int, y0: int) -> torch.Tensor:
        size = self.patch + 2 * self.margin
        return self.stack[z:z + 1, :, y0:y0 + size, x0:x0 + size]

    def sample(self, batch: int, g: torch.Generator) -> Batch:
        srcs, tgts, truths, valids = [], [], [], []
        zs = self.stack.shape[0]
        p, m = self.patch, self.margin
        size = p + 2 * m
        inner = (slice(None), slice(None), slice(m, m + p), slice(m, m + p))
        for _ in range(batch):
            neighbour = _uniform(g, 0, 1) < self.neighbour_fraction
            z = int(torch.randint(1 if neighbour else 0, zs, (), generator=g))
            x0 = int(torch.randint(0, self.w - p + 1, (), generator=g))
            y0 = int(torch.randint(0, self.h - p + 1, (), generator=g))
            k = int(torch.randint(0, 8, (), generator=g))
            image = _dihedral(self._window(z, x0, y0), k)
            deformed, total, _ = deform(image, *_deformation(size, g, self.deform))
            if neighbour:
                src, tgt = deformed, _dihedral(self._window(z - 1, x0, y0), k)
                truth, valid = torch.zeros_like(total), torch.zeros_like(image, dtype=torch.bool)
            elif _uniform(g, 0, 1) < 0.5:  # the deformed copy is the target: truth is `total` itself
                src, tgt, truth = image, deformed, total
                valid = torch.ones_like(image, dtype=torch.bool)
            else:  # the deformed copy is the source (as in a real alignment): truth is the inverse
                src, tgt = deformed, image
                with warnings.catch_warnings():  # no convergence across a crack: masked out below
                    warnings.simplefilter("ignore", RuntimeWarning)
                    truth = fields.invert(total, iterations=60, tolerance=1e-3)
                valid = fields.compose(total, truth).norm(dim=1, keepdim=True) < 0.1
            if _uniform(g, 0, 1) < self.deform.debris_probability:
                blob = synthetic.debris_mask(size, size, radius=_uniform(g, *self.deform.debris_radius),
                                             seed=_seed(g))
                if _uniform(g, 0, 1) < 0.5:
                    src = src.masked_fill(blob, 0.0)
                else:
                    tgt = tgt.masked_fill(blob, 0.0)
            srcs.append(_intensity(src[inner], g))
            tgts.append(_intensity(tgt[inner], g))
            truths.append(truth[inner])
            valids.append(valid[inner])
        return Batch(torch.cat(srcs), torch.cat(tgts), torch.cat(truths), torch.cat(valids))


# --------------------------------------------------------------------------------------------------
# loss
# --------------------------------------------------------------------------------------------------
def _epe(pred: torch.Tensor, truth: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    err = (pred - truth).square().sum(dim=1, keepdim=True).add(1e-6).sqrt()
    return (err * weight).sum() / weight.sum().clamp_min(1.0)


def masked_mse(src: torch.Tensor, tgt: torch.Tensor, field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE of warp(src, field) against tgt, both normalised over their tissue, on the target's tissue;
    True where the source sample touches black): black source pixels never attract the field."""
    h, w = src.shape[-2:]
    src_n, _ = normalise(src)
    tgt_n, tgt_mask = normalise(tgt)
    with torch.no_grad():
        coords = fields.pixel_grid(h, w, device=field.device) + field
        src_bad = fields.sample_mask(src <= 0, coords, rule="any")
        mse_w = tgt_mask * (~src_bad).to(tgt_mask.dtype)
    return ((fields.warp(src_n, field) - tgt_n).square() * mse_w).sum() / mse_w.sum().clamp_min(1.0), src_bad


def compute_loss(model: PyramidNet, batch: Batch, smoothness_weight: float, epe_weight: float
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    src, tgt = batch.src, batch.tgt
    h, w = src.shape[-2:]
    levels = model(src, tgt, return_levels=True)
    field = levels[-1][..., :h, :w]
    mse, src_bad = masked_mse(src, tgt, field)
    smooth = fields.smoothness(field)
    loss = mse + smoothness_weight * smooth
    stats = {"mse": mse.item(), "smooth": smooth.item()}
    epe_w = (batch.truth_valid & (tgt > 0) & ~src_bad).to(field.dtype)
    if epe_weight > 0 and float(epe_w.sum()) > 0:
        epe = _epe(field, batch.truth, epe_w)
        n_levels = len(levels)
        coarse = sum(_epe(fields.resample(f, n_levels - 1 - i, 0)[..., :h, :w], batch.truth, epe_w)
                     for i, f in enumerate(levels[:-1]))
        loss = loss + epe_weight * (epe + 0.25 * coarse)
        stats["epe"] = epe.item()
    stats["loss"] = loss.item()
    return loss, stats


# --------------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------------
_CKPT = re.compile(r"^step-(\d{7,})\.pt$")


def _cloudfiles(folder: str):
    from cloudfiles import CloudFiles

    from .volumes import storage_secrets

    return CloudFiles(folder, secrets=storage_secrets(folder))


def checkpoint_dir(out_archive: str) -> str:
    return resolve_archive_path(out_archive).rstrip("/") + ".ckpt"


def _list_checkpoints(folder: str) -> list[tuple[int, str]]:
    if "://" in folder:
        names = list(_cloudfiles(folder).list())
    else:
        names = os.listdir(folder) if os.path.isdir(folder) else []
    found = [(int(m.group(1)), n) for n in names if (m := _CKPT.match(n))]
    return sorted(found)


def _write_checkpoint(folder: str, step: int, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    name = f"step-{step:07d}.pt"
    if "://" in folder:
        cf = _cloudfiles(folder)
        cf.put(name, buf.getvalue(), compress=None)
        for _, old in _list_checkpoints(folder)[:-KEEP_CHECKPOINTS]:
            cf.delete(old)
        return
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(folder, name))
    for _, old in _list_checkpoints(folder)[:-KEEP_CHECKPOINTS]:
        os.remove(os.path.join(folder, old))


def _read_checkpoint(folder: str, name: str) -> dict[str, Any]:
    if "://" in folder:
        data = _cloudfiles(folder).get(name)
    else:
        data = Path(folder, name).read_bytes()
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise InputError(f"checkpoint {folder}/{name} is unreadable ({exc}); delete it to resume from an "
                         "earlier one") from None


# --------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------
def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps (at most 100), then cosine decay to 5% of lr."""
    warm = max(1, min(100, steps // 20))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train_command(src_layer_path: str, out_archive: str, *, z_range: tuple[int, int], mip: int, steps: int,
                  batch: int, patch: int, lr: float, smoothness: float, seed: int, checkpoint_every: int,
                  device: str, epe_weight: float) -> str:
    """The `seamless train` command line that reproduces a run."""
    args = ["seamless", "train", "--src", src_layer_path, "--dst", out_archive, "--z", f"{z_range[0]}:{z_range[1]}",
            "--mip", str(mip), "--steps", str(steps), "--batch", str(batch), "--patch", str(patch),
            "--lr", f"{lr:g}", "--smoothness", f"{smoothness:g}", "--epe-weight", f"{epe_weight:g}",
            "--seed", str(seed), "--checkpoint-every", str(checkpoint_every), "--device", device]
    return shlex.join(args)


def train(src_layer_path: str, out_archive: str, *, z_range: tuple[int, int], mip: int, steps: int, batch: int,
          patch: int, lr: float, smoothness: float, seed: int, resume: bool, checkpoint_every: int, device: str,
          epe_weight: float = 1.0, config: PyramidConfig | dict[str, Any] | None = None,
          threads: int | None = 1, log_every: int = 50) -> dict[str, Any]:
    """Train a PyramidNet on sections z_range of an image layer at `mip`; writes the archive and returns
    its manifest. See the module docstring for the data and the loss.

    threads: torch CPU threads during training (default 1, restored afterwards; None leaves torch's
    setting). config: layer sizes (default PyramidConfig()). Results are bit-identical between an
    uninterrupted run and a resumed one on CPU; on CUDA, grid_sample's backward is not deterministic.
    """
    for name, value, low in (("steps", steps, 1), ("batch", batch, 1), ("patch", patch, 8),
                             ("checkpoint_every", checkpoint_every, 1), ("log_every", log_every, 1)):
        if int(value) != value or value < low:
            raise InputError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if not lr > 0:
        raise InputError(f"--lr must be positive, got {lr}")
    if smoothness < 0 or epe_weight < 0:
        raise InputError("--smoothness and --epe-weight must be >= 0")
    cfg = config if isinstance(config, PyramidConfig) else (PyramidConfig.from_dict(config) if config else PyramidConfig())
    dev = resolve_device(device)
    command = train_command(src_layer_path, out_archive, z_range=z_range, mip=mip, steps=steps, batch=batch,
                            patch=patch, lr=lr, smoothness=smoothness, seed=seed,
                            checkpoint_every=checkpoint_every, device=device, epe_weight=epe_weight)
    # what must not change between a run and its resumption (steps may grow: training continues)
    identity = {"src": src_layer_path, "z_range": [int(z_range[0]), int(z_range[1])], "mip": int(mip),
                "batch": int(batch), "patch": int(patch), "lr": float(lr), "smoothness": float(smoothness),
                "epe_weight": float(epe_weight), "seed": int(seed), "config": cfg.to_dict()}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        sections = load_sections(src_layer_path, z_range, mip)
        sampler = PairSampler(sections, patch)
        torch.manual_seed(seed)
        model = PyramidNet(cfg).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        ckpt_dir = checkpoint_dir(out_archive)
        step, elapsed = 0, 0.0
        history: list[dict[str, float]] = []
        if resume:
            found = _list_checkpoints(ckpt_dir)
            if not found:
                log.info("train: no checkpoint in %s, starting from step 0", ckpt_dir)
            else:
                state = _read_checkpoint(ckpt_dir, found[-1][1])
                if state.get("format") != CHECKPOINT_FORMAT:
                    raise InputError(f"checkpoint {ckpt_dir}/{found[-1][1]} has an unknown format")
                if state["identity"] != identity:
                    diff = sorted(k for k in identity if state["identity"].get(k) != identity[k])
                    raise InputError(f"cannot resume from {ckpt_dir}: the run used different {', '.join(diff)}; "
                                     "use the same options or a new --dst")
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                g.set_state(state["generator"])
                torch.set_rng_state(state["torch_rng"])
                step, elapsed, history = int(state["step"]), float(state["seconds"]), list(state["history"])
                if state["steps"] != steps:
                    log.warning("train: resuming a %d-step run as a %d-step run (the LR schedule changes)",
                                state["steps"], steps)
                log.info("train: resumed from %s/%s at step %d", ckpt_dir, found[-1][1], step)

        def save_checkpoint() -> None:
            _write_checkpoint(ckpt_dir, step, {
                "format": CHECKPOINT_FORMAT, "identity": identity, "steps": steps, "step": step,
                "seconds": elapsed, "history": history, "model": model.state_dict(),
                "optimizer": opt.state_dict(), "generator": g.get_state(), "torch_rng": torch.get_rng_state(),
            })

        log.info("train: %d sections %s at MIP %d, %d parameters, steps %d..%d, batch %d, patch %d, device %s",
                 sections.shape[0], tuple(sections.shape[-2:]), mip, count_parameters(model), step, steps, batch,
                 patch, dev)
        model.train()
        window: list[dict[str, float]] = []
        t_window = time.perf_counter()
        while step < steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, lr)
            data = sampler.sample(batch, g)
            data = Batch(*(t.to(dev) for t in (data.src, data.tgt, data.truth, data.truth_valid)))
            loss, stats = compute_loss(model, data, smoothness, epe_weight)
            if not math.isfinite(stats["loss"]):
                raise RuntimeError(f"training diverged at step {step} (loss {stats['loss']}); lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            step += 1
            elapsed += time.perf_counter() - t0
            window.append(stats)
            if step % log_every == 0 or step == steps:
                mean = {k: float(np.mean([s[k] for s in window if k in s])) for k in window[-1]}
                rate = len(window) / max(1e-9, time.perf_counter() - t_window)
                history.append({"step": step, **mean})
                log.info("train: step %d/%d loss %.4f mse %.4f smooth %.4f%s lr %.2e, %.2f steps/s", step, steps,
                         mean["loss"], mean["mse"], mean["smooth"],
                         f" epe {mean['epe']:.3f} px" if "epe" in mean else "", opt.param_groups[0]["lr"], rate)
                window, t_window = [], time.perf_counter()
            if step % checkpoint_every == 0 or step == steps:
                save_checkpoint()
        final = history[-1] if history else {}
        training = {
            "command": command,
            "data": {"layer": src_layer_path, "z_range": identity["z_range"], "mip": int(mip),
                     "sections": int(sections.shape[0]), "section_shape": list(sections.shape[-2:]),
                     "pairs": f"synthetic deformations of single sections ({1 - sampler.neighbour_fraction:.0%}) and "
                              f"deformed true neighbour pairs z vs z-1 ({sampler.neighbour_fraction:.0%})",
                     "deformations": asdict(sampler.deform)},
            "loss": "masked MSE(warp(src, f), tgt) on tissue + smoothness * fields.smoothness(f) "
                    "+ epe_weight * (EPE(f) + 0.25 * sum of coarser levels' EPE) on synthetic pairs",
            "steps": steps, "batch": batch, "patch": patch, "lr": lr, "smoothness": smoothness,
            "epe_weight": epe_weight, "seed": seed, "device": str(dev), "threads": torch.get_num_threads(),
            "seconds": round(elapsed, 1), "final_losses": {k: round(v, 5) for k, v in final.items() if k != "step"},
            "history": [{k: (round(v, 5) if k != "step" else int(v)) for k, v in h.items()} for h in history],
            "torch": torch.__version__,
        }
        manifest = save_archive(out_archive, model, cfg.to_dict(), training, mip=int(mip), architecture=ARCHITECTURE)
        log.info("train: wrote %s (%d parameters) after %d steps in %.0f s", resolve_archive_path(out_archive),
                 count_parameters(model), steps, elapsed)
        return manifest
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
