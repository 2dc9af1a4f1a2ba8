"""The online finetuner: gradient descent (Adam) on a dense field, initialised by the coarser stage.

loss(f) = similarity(warp(src, f), tgt) over valid pixels + smoothness * penalty(differences of f)

Valid pixels are target pixels with tissue and without defects whose source sample (through the
current field) touches no black, defect or out-of-window source pixel. That source mask is recomputed
every `mask_every` iterations without gradient, so black pixels never attract the field: a target
pixel that looks at black simply drops out of the similarity and the smoothness term carries the field
there.

The smoothness penalty acts on the forward differences d of the field between neighbouring pixels:
"l2" is the membrane energy |d|^2, "charbonnier" is sqrt(|d|^2 + eps^2) - eps (quadratic below eps px,
linear above, so a crack can open as a sharp step instead of being smeared over many pixels), "l1" is
|dx| + |dy| per component (total variation).

The optimisation can run coarse to fine inside the stage (`levels` > 1): the images are averaged down
by 2^k and the field is refined at each level before the next, which widens the capture range.

A loss or gradient that is NaN or infinite rolls the field back to the last good one and halves the
learning rate (as the original SEAMLeSS did), at most `max_rollbacks` times. `last_stats` records what
happened: iterations, final loss, stopped_early, rollbacks, seconds.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from .. import fields
from .base import Pair
from .block_matching import masked_blur
from .params import EstimatorParams

__all__ = ["Finetuner"]

#: the "ncc" data term is NCC_SCALE * (1 - local NCC): on EM content this puts it on the scale of the
#: MSE term, so the same `smoothness` weights work for both (measured on the shared sections).
NCC_SCALE = 0.01


class FinetunerParams(EstimatorParams):
    """The finetuner's parameters, in pixels at the stage's MIP (see Finetuner)."""

    lr: float = Field(0.1, gt=0)
    max_iterations: int = Field(300, ge=1)
    patience: int = Field(10, ge=1)
    min_improvement: float = Field(1e-3, ge=0, lt=1)
    lr_decays: int = Field(3, ge=0)
    smoothness: float = Field(0.005, ge=0)
    penalty: Literal["charbonnier", "l2", "l1"] = "charbonnier"
    eps: float = Field(0.05, gt=0)
    similarity: Literal["mse", "charbonnier", "ncc"] = "mse"
    sim_eps: float = Field(0.01, gt=0)
    ncc_window: int = Field(9, ge=3, description="odd")
    blur: float = Field(1.0, ge=0, le=16)
    levels: int = Field(1, ge=1, le=6)
    mask_every: int = Field(5, ge=1)
    max_rollbacks: int = Field(5, ge=0)

    @field_validator("ncc_window")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 != 1:
            raise ValueError("must be odd")
        return value


class Finetuner:
    """Adam on the dense field; returns the total field (it starts from `init`, not from zero).

    Parameters (pixels at the stage's MIP):
      lr: Adam learning rate, roughly the largest step in px per iteration.
      max_iterations: iterations per pyramid level.
      patience: stop a level after this many iterations without a relative loss improvement of
        `min_improvement`; the learning rate is first halved `lr_decays` times on such plateaus.
      min_improvement: relative improvement that counts (e.g. 1e-3 = 0.1 %).
      lr_decays: how many times a plateau halves the learning rate before the level stops.
      smoothness: weight of the smoothness penalty.
      penalty: "charbonnier" (default: follows cracks), "l2" (membrane) or "l1" (total variation).
      eps: the Charbonnier corner in px of difference between neighbours.
      similarity: "mse" (default), "charbonnier" (robust: sqrt(r^2 + sim_eps^2)) or "ncc" (local NCC in
        `ncc_window` px windows; ~4x slower).
      sim_eps: the corner of the robust similarity, in intensity units.
      ncc_window: side of the window of the "ncc" similarity (local normalised cross-correlation,
        insensitive to contrast and brightness changes between sections).
      blur: gaussian sigma in px applied to both images before comparing (reduces interpolation bias
        and widens the basin; 0 = none).
      levels: internal coarse-to-fine levels (1 = only the stage's own resolution).
      mask_every: recompute the source validity mask every this many iterations.
      max_rollbacks: how many NaN/inf rollbacks are tolerated before the level stops.
    """

    name = "finetuner"

    def __init__(self, **params: Any) -> None:
        self.params = FinetunerParams.checked(params)
        self.__dict__.update(self.params.model_dump())
        self.last_stats: dict = {}

    def __repr__(self) -> str:
        return f"Finetuner({', '.join(f'{k}={v!r}' for k, v in self.params.model_dump().items())})"

    @property
    def margin(self) -> int:
        """Source pixels beyond the init's reach the optimisation may move to (for choosing src windows)."""
        return 8 * 2 ** (self.levels - 1)

    # ----------------------------------------------------------------------------------------------
    def __call__(self, pair: Pair, init: Tensor | None = None) -> Tensor:
        with flush_denormal():
            return self._run(pair, init)

    def _run(self, pair: Pair, init: Tensor | None) -> Tensor:
        start = time.perf_counter()
        h, w = pair.shape
        n = max(pair.src.shape[0], pair.tgt.shape[0])
        device = pair.tgt.device
        field = (
            fields.identity(h, w, n, device=device)
            if init is None
            else init.detach().to(device=device, dtype=torch.float32).expand(n, -1, -1, -1).clone()
        )
        stats = {
            "iterations": 0,
            "initial_loss": float("nan"),
            "final_loss": float("nan"),
            "stopped_early": False,
            "rollbacks": 0,
            "levels": [],
        }
        if not bool(pair.tgt_valid().any()):
            # nothing to compare with: keep init rather than letting the smoothness term reshape it
            stats.update(skipped="no valid target pixels", seconds=time.perf_counter() - start)
            self.last_stats = stats
            return field
        for level in reversed(range(self.levels)):
            if min(h, w) >> level < 8:
                continue
            sub = _downsample_pair(pair, level) if level else pair
            start_field = fields.resample(field, 0, level) if level else field
            refined, level_stats = self._optimise(sub, start_field)
            if level:
                # add the coarse correction, keeping the detail of the finer field
                field = field + fields.resample(refined - start_field, level, 0)[..., :h, :w]
            else:
                field = refined
            if not stats["levels"]:
                stats["initial_loss"] = level_stats["initial_loss"]
            stats["iterations"] += level_stats["iterations"]
            stats["rollbacks"] += level_stats["rollbacks"]
            stats["final_loss"] = level_stats["final_loss"]
            stats["stopped_early"] = level_stats["stopped_early"]
            stats["levels"].append({"level": level, **level_stats})
        stats["seconds"] = time.perf_counter() - start
        self.last_stats = stats
        return field

    # ----------------------------------------------------------------------------------------------
    def _prepare(self, pair: Pair) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Images (blurred, NaN-free) and the static masks: (src, tgt, src_bad, tgt_valid)."""
        src = pair.src.float()
        tgt = pair.tgt.float()
        src_bad = ~torch.isfinite(src) | (src <= 0)
        if pair.src_defects is not None:
            src_bad = src_bad | (pair.src_defects > 0)
        tgt_valid = torch.isfinite(tgt) & pair.tgt_valid()
        src = torch.nan_to_num(src, nan=0.0, posinf=0.0, neginf=0.0)
        tgt = torch.nan_to_num(tgt, nan=0.0, posinf=0.0, neginf=0.0)
        if self.blur > 0:
            src = masked_blur(src, ~src_bad, self.blur)
            tgt = masked_blur(tgt, tgt_valid, self.blur)
        return src, tgt, src_bad, tgt_valid

    def _valid(self, pair: Pair, src_bad: Tensor, tgt_valid: Tensor, field: Tensor) -> Tensor:
        with torch.no_grad():
            coords = pair.coords(field)
            hs, ws = pair.src.shape[-2:]
            x, y = coords[:, 0:1], coords[:, 1:2]
            outside = (x < 0) | (y < 0) | (x > ws - 1) | (y > hs - 1)
            invalid = fields.sample_mask(src_bad, coords, rule="any") | outside
            return (tgt_valid & ~invalid).float()

    def _loss(
        self, pair: Pair, src: Tensor, tgt: Tensor, valid: Tensor, field: Tensor, origin: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(total loss, data loss); both means (per valid pixel, per neighbour pair).

        `origin` = pair.coords of a zero field (pixel grid + offset), computed once per optimisation:
        origin + field is pair.coords(field) bit for bit, one full-size addition less per iteration."""
        warped = fields.sample(src, pair.coords(field) if origin is None else origin + field)
        diff = warped - tgt
        if self.similarity == "mse":
            per_pixel = diff.square()
        elif self.similarity == "charbonnier":
            per_pixel = torch.sqrt(diff.square() + self.sim_eps**2) - self.sim_eps
        else:
            per_pixel = NCC_SCALE * (1 - _local_ncc(warped, tgt, valid, self.ncc_window))
        count = valid.sum().clamp_min(1.0)
        data = (per_pixel * valid).sum() / count
        if self.smoothness == 0:
            return data, data
        return data + self.smoothness * self._penalty(field), data

    def _penalty(self, field: Tensor) -> Tensor:
        dx = field[..., :, 1:] - field[..., :, :-1]
        dy = field[..., 1:, :] - field[..., :-1, :]
        if self.penalty == "l2":
            return dx.square().sum(1).mean() + dy.square().sum(1).mean()
        if self.penalty == "l1":
            return dx.abs().sum(1).mean() + dy.abs().sum(1).mean()
        e2 = self.eps**2
        return (
            (dx.square().sum(1) + e2).sqrt().mean() + (dy.square().sum(1) + e2).sqrt().mean() - 2 * self.eps
        )

    def _optimise(self, pair: Pair, init: Tensor) -> tuple[Tensor, dict]:
        src, tgt, src_bad, tgt_valid = self._prepare(pair)
        scale = float(init.shape[-2] * init.shape[-1] * init.shape[0])  # gradients O(1) per pixel for Adam
        field = init.clone().requires_grad_(True)
        lr = self.lr
        optimiser = torch.optim.Adam([field], lr=lr)
        good = init.clone()
        best = math.inf
        stale = 0
        decays = 0
        rollbacks = 0
        last_loss = math.nan
        first_loss = math.nan
        stopped_early = False
        origin = pair.coords(torch.zeros_like(init[:1]))  # (grid + offset) + 0: exact
        valid = self._valid(pair, src_bad, tgt_valid, field)
        iteration = 0
        while iteration < self.max_iterations:
            if iteration and iteration % self.mask_every == 0:
                valid = self._valid(pair, src_bad, tgt_valid, field)
            optimiser.zero_grad(set_to_none=True)
            loss, _ = self._loss(pair, src, tgt, valid, field, origin)
            value = float(loss.detach())
            finite = math.isfinite(value)
            if finite:
                (loss * scale).backward()
                # one reduction, not isfinite + all (4 passes): a NaN or inf anywhere makes the sum non-finite
                # (gradients are O(1) per pixel, see `scale`: a finite sum cannot overflow)
                finite = math.isfinite(float(field.grad.sum()))
            if not finite:
                rollbacks += 1
                if rollbacks > self.max_rollbacks:
                    break
                lr *= 0.5
                with torch.no_grad():
                    field.copy_(good)
                optimiser = torch.optim.Adam([field], lr=lr)
                iteration += 1
                continue
            good.copy_(field.detach())
            last_loss = value
            if math.isnan(first_loss):
                first_loss = value
            if value < best * (1 - self.min_improvement):
                best = value
                stale = 0
            else:
                stale += 1
                if stale >= self.patience:
                    if decays >= self.lr_decays:
                        stopped_early = True
                        iteration += 1
                        break
                    decays += 1
                    stale = 0
                    best = value
                    lr *= 0.5
                    for group in optimiser.param_groups:
                        group["lr"] = lr
            optimiser.step()
            iteration += 1
        # `good` is the last field whose loss and gradient were finite (the final step is not evaluated)
        return good, {
            "iterations": iteration,
            "initial_loss": first_loss,
            "final_loss": last_loss,
            "stopped_early": stopped_early,
            "rollbacks": rollbacks,
            "lr": lr,
        }


@contextmanager
def flush_denormal():
    """Flush denormal floats to zero while inside (grid_sample's backward makes them; they cost ~4x
    on x86 CPUs). torch has no getter for the flag, so it is reset to torch's default (off) on exit."""
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def _local_ncc(a: Tensor, b: Tensor, valid: Tensor, window: int) -> Tensor:
    """Per-pixel NCC of a and b over a window x window box, counting valid pixels only."""
    pad = window // 2

    def box(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, window, 1, pad, count_include_pad=False)

    weight = box(valid).clamp_min(1e-6)
    mean_a, mean_b = box(a * valid) / weight, box(b * valid) / weight
    var_a = box(a * a * valid) / weight - mean_a**2
    var_b = box(b * b * valid) / weight - mean_b**2
    cov = box(a * b * valid) / weight - mean_a * mean_b
    return cov / torch.sqrt(var_a.clamp_min(1e-6) * var_b.clamp_min(1e-6))


def _downsample_pair(pair: Pair, level: int) -> Pair:
    """The pair averaged down by 2^level (masks: any pixel of a block); the offset scales with it."""
    k = 2**level

    def img(t: Tensor) -> Tensor:
        return F.avg_pool2d(t, k, ceil_mode=True)

    def mask(t: Tensor | None) -> Tensor | None:
        return None if t is None else F.max_pool2d((t > 0).float(), k, ceil_mode=True)

    # crop the source so the offset is a multiple of k: target pixel i then sits at src pixel i + offset / k
    ox, oy = pair.offset[0] % k, pair.offset[1] % k
    src_full = pair.src[..., oy:, ox:]
    src_def = None if pair.src_defects is None else pair.src_defects[..., oy:, ox:]
    # a block with any black pixel becomes black, so "black never attracts" survives the pooling
    src = img(src_full).masked_fill(F.max_pool2d((src_full <= 0).float(), k, ceil_mode=True) > 0, 0.0)
    tgt = img(pair.tgt).masked_fill(F.max_pool2d((pair.tgt <= 0).float(), k, ceil_mode=True) > 0, 0.0)
    offset = ((pair.offset[0] - ox) // k, (pair.offset[1] - oy) // k)
    return Pair(
        src=src, tgt=tgt, offset=offset, src_defects=mask(src_def), tgt_defects=mask(pair.tgt_defects)
    )
