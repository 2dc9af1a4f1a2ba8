"""The learned SEAMLeSS pyramid: a siamese feature encoder and a field network per level, coarse to fine.

Architecture (after Mitchell et al., "Siamese encoding and alignment by multiscale learning with
self-supervision", 2019), kept small enough to train on a CPU in minutes:

* **Siamese encoder** (one set of weights for src and tgt): level 0 works at the input resolution, each
  further level halves it (average pooling) and applies two 3x3 convolutions, giving a feature pyramid
  of `len(enc_channels)` levels. Its input is the image normalised on its tissue pixels (mean 0, std 1;
  pixels that are 0 = no tissue stay 0) and the tissue mask as a second channel.
* **Field networks**, one per level, coarse to fine: at level l the current field (the coarser level's
  field upsampled x2 with values x2, i.e. `fields.resample(f, l + 1, l)`) warps the src features; a
  small CNN takes [tgt features, warped src features] and predicts a residual field r, and the level's
  field becomes `compose(r, current)` (warp by the current field first, then by r).
* **One addition to the original** (`corr_radius > 0`, the default): each level also computes a cosine
  cost volume between the tgt features and the warped src features over +-corr_radius px, averaged over
  a corr_window^2 neighbourhood (block matching inside the network), and its soft-argmax, a residual
  estimate without parameters. The CNN sees the cost volume and that estimate, and outputs a correction
  to it. Why: with the plain SEAMLeSS field CNN the training EPE was still 5.8 px after 300 steps (the
  network had not started to match; it needs far more training than a CPU budget gives), with the cost
  volume and soft-argmax it was 0.33 px after the same 300 steps (docs/pyramid.md). `corr_radius=0`
  gives the original architecture.
* The level-0 field is the output: a pull field in **pixels of the input** (project convention,
  channel 0 = x). Inputs of any H, W are padded with zeros (no tissue) to a multiple of 2^(levels-1)
  and the field is cropped back.

`PyramidEstimator` wraps a trained archive (`seamless_core.models.archive`) as an `Estimator`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fields
from ..devices import resolve_device
from .base import Pair

__all__ = ["PyramidConfig", "PyramidNet", "PyramidEstimator", "normalise", "clear_cache"]

ARCHITECTURE = "seamless-pyramid"


# --------------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PyramidConfig:
    """Layer sizes of a PyramidNet; stored verbatim as model.json's "config"."""

    enc_channels: tuple[int, ...] = (8, 16, 24, 32)  # feature channels per level, fine -> coarse
    field_channels: tuple[int, ...] = (16, 24, 32, 32)  # hidden width of each level's field CNN
    field_layers: int = 4  # convolutions per field CNN (the last one outputs the 2-channel residual)
    kernel: int = 3
    corr_radius: int = 2  # > 0: a cost volume of +-radius px and its soft-argmax feed each field CNN
    corr_window: int = 5  # the cost volume is averaged over this odd window (1 = per pixel)

    def __post_init__(self) -> None:
        object.__setattr__(self, "enc_channels", tuple(int(c) for c in self.enc_channels))
        object.__setattr__(self, "field_channels", tuple(int(c) for c in self.field_channels))
        if len(self.enc_channels) < 1 or len(self.enc_channels) != len(self.field_channels):
            raise ValueError(f"enc_channels {self.enc_channels} and field_channels {self.field_channels} must "
                             "be non-empty and of equal length (one entry per pyramid level)")
        if any(c < 1 for c in self.enc_channels + self.field_channels):
            raise ValueError("channel counts must be positive")
        if self.field_layers < 2:
            raise ValueError(f"field_layers must be >= 2, got {self.field_layers}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be odd and positive, got {self.kernel}")
        if self.corr_radius < 0:
            raise ValueError(f"corr_radius must be >= 0, got {self.corr_radius}")
        if self.corr_window < 1 or self.corr_window % 2 == 0:
            raise ValueError(f"corr_window must be odd and positive, got {self.corr_window}")

    @property
    def levels(self) -> int:
        return len(self.enc_channels)

    @property
    def multiple(self) -> int:
        """Inputs are padded to a multiple of this."""
        return 2 ** (self.levels - 1)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PyramidConfig:
        if not isinstance(data, dict):
            raise ValueError(f"config must be an object, got {type(data).__name__}")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**data)


def normalise(image: Tensor) -> tuple[Tensor, Tensor]:
    """(N,1,H,W) image -> (normalised image, tissue mask): mean 0, std 1 over each image's tissue (> 0)."""
    mask = (image > 0).to(image.dtype)
    count = mask.sum(dim=(1, 2, 3), keepdim=True).clamp_min(1.0)
    mean = (image * mask).sum(dim=(1, 2, 3), keepdim=True) / count
    var = ((image - mean).square() * mask).sum(dim=(1, 2, 3), keepdim=True) / count
    std = var.sqrt().clamp_min(1e-3)
    return (image - mean) / std * mask, mask


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class _Encoder(nn.Module):
    def __init__(self, cfg: PyramidConfig) -> None:
        super().__init__()
        blocks = []
        cin = 2
        for c in cfg.enc_channels:
            blocks.append(nn.Sequential(_conv(cin, c, cfg.kernel), nn.LeakyReLU(0.1),
                                        _conv(c, c, cfg.kernel), nn.LeakyReLU(0.1)))
            cin = c
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, block in enumerate(self.blocks):
            if i:
                x = F.avg_pool2d(x, 2)
            x = block(x)
            out.append(x)
        return out


def local_correlation(a: Tensor, b: Tensor, radius: int) -> Tensor:
    """(N, (2r+1)^2, H, W): channel-sum of a(p) * b(p + d) for every d in [-r, r]^2 (row-major: dy outer)."""
    h, w = a.shape[-2:]
    padded = F.pad(b, (radius, radius, radius, radius))
    size = 2 * radius + 1
    return torch.cat([(a * padded[..., dy:dy + h, dx:dx + w]).sum(dim=1, keepdim=True)
                      for dy in range(size) for dx in range(size)], dim=1)


def _displacements(radius: int) -> Tensor:
    """(1, 2, (2r+1)^2, 1, 1) x, y of each correlation channel."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([dx.reshape(-1), dy.reshape(-1)]).view(1, 2, -1, 1, 1)


class _FieldNet(nn.Module):
    """One level's residual field: a CNN on [tgt features, warped src features] (SEAMLeSS); with
    corr_radius > 0 also a cosine cost volume over +-radius px, averaged over a corr_window^2
    neighbourhood, whose soft-argmax is a parameter-free residual estimate the CNN then corrects."""

    def __init__(self, channels: int, width: int, layers: int, k: int, corr_radius: int = 0,
                 corr_window: int = 1) -> None:
        super().__init__()
        self.corr_radius = corr_radius
        self.corr_window = corr_window
        n_disp = (2 * corr_radius + 1) ** 2 if corr_radius else 0
        mods: list[nn.Module] = []
        cin = 2 * channels + (n_disp + 2 if corr_radius else 0)
        for _ in range(layers - 1):
            mods += [_conv(cin, width, k), nn.LeakyReLU(0.1)]
            cin = width
        last = _conv(cin, 2, k)
        nn.init.zeros_(last.weight)  # an untrained level adds nothing to the soft-argmax (or to the field)
        nn.init.zeros_(last.bias)
        mods.append(last)
        self.net = nn.Sequential(*mods)
        if corr_radius:
            self.log_beta = nn.Parameter(torch.tensor(math.log(10.0)))
            self.register_buffer("disp", _displacements(corr_radius), persistent=False)

    def forward(self, tgt_feat: Tensor, src_feat: Tensor) -> Tensor:
        if not self.corr_radius:
            return self.net(torch.cat([tgt_feat, src_feat], dim=1))
        cost = local_correlation(F.normalize(tgt_feat, dim=1), F.normalize(src_feat, dim=1), self.corr_radius)
        if self.corr_window > 1:
            cost = F.avg_pool2d(cost, self.corr_window, stride=1, padding=self.corr_window // 2,
                                count_include_pad=False)
        prob = torch.softmax(cost * self.log_beta.exp(), dim=1)
        estimate = (prob.unsqueeze(1) * self.disp).sum(dim=2)
        return estimate + self.net(torch.cat([tgt_feat, src_feat, cost, estimate], dim=1))


class PyramidNet(nn.Module):
    """src, tgt (N,1,H,W) in [0,1] (0 = no tissue) -> pull field (N,2,H,W) in input pixels."""

    def __init__(self, config: PyramidConfig | dict[str, Any] | None = None) -> None:
        super().__init__()
        if config is None:
            config = PyramidConfig()
        elif isinstance(config, dict):
            config = PyramidConfig.from_dict(config)
        self.config = config
        self.encoder = _Encoder(config)
        self.field_nets = nn.ModuleList(
            _FieldNet(c, w, config.field_layers, config.kernel, config.corr_radius, config.corr_window)
            for c, w in zip(config.enc_channels, config.field_channels)
        )

    def forward(self, src: Tensor, tgt: Tensor, *, return_levels: bool = False) -> Tensor | list[Tensor]:
        """The field; with return_levels, the list of level fields (coarse first, each in its level's
        pixels, over the padded grid), whose last entry padded-cropped is the field."""
        if src.shape != tgt.shape or src.dim() != 4 or src.shape[1] != 1:
            raise ValueError(f"src and tgt must both be (N, 1, H, W), got {tuple(src.shape)} and {tuple(tgt.shape)}")
        n, _, h, w = src.shape
        m = self.config.multiple
        ph, pw = (-h) % m, (-w) % m
        both = torch.cat([src, tgt], dim=0)
        if ph or pw:
            both = F.pad(both, (0, pw, 0, ph))
        normed, mask = normalise(both)
        feats = self.encoder(torch.cat([normed, mask], dim=1))
        field_l: Tensor | None = None
        levels: list[Tensor] = []
        for level in reversed(range(self.config.levels)):
            src_f, tgt_f = feats[level][:n], feats[level][n:]
            if field_l is None:
                warped = src_f
            else:
                field_l = fields.resample(field_l, level + 1, level)
                warped = fields.warp(src_f, field_l)
            residual = self.field_nets[level](tgt_f, warped)
            field_l = residual if field_l is None else fields.compose(residual, field_l)
            levels.append(field_l)
        if return_levels:
            return levels
        assert field_l is not None
        return field_l[..., :h, :w]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------------
# the estimator
# --------------------------------------------------------------------------------------------------
_CACHE: dict[tuple[str, str], Any] = {}
_CACHE_LOCK = threading.Lock()


def clear_cache() -> None:
    """Forget the loaded models (tests; or after replacing an archive in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _load_cached(archive: str, device: torch.device) -> Any:
    from ..models.archive import load_archive, resolve_archive_path

    key = (resolve_archive_path(archive), str(device))
    with _CACHE_LOCK:
        loaded = _CACHE.get(key)
        if loaded is None:
            loaded = load_archive(archive, device=device)
            _CACHE[key] = loaded
        return loaded


@dataclass
class PyramidEstimator:
    """The learned pyramid as an Estimator: `est(pair, init)` -> total pull field over the target grid.

    archive: folder (local path, file:// or gs://) holding model.json + weights.safetensors; None = the
      archive committed with the package (`seamless_core.models.DEFAULT_ARCHIVE`, trained at MIP 2).
    device: cpu, cuda, cuda:N or auto. batch_size: sections per forward pass.
    The loaded model is cached per process (archive path, device). A larger src window than the target
    (Pair.offset) gives the network context: it runs over the whole window and the field is cropped.
    `init` is honoured exactly: src is pre-warped by it (extended over the window with its edge values),
    the network predicts the residual r and the result is compose(r, init). Sections with no tissue
    (all 0) on either side return `init` (or the identity) unchanged.
    """

    archive: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    name: str = field(default="pyramid", init=False)

    def __post_init__(self) -> None:
        from ..models import DEFAULT_ARCHIVE

        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.archive = str(self.archive) if self.archive is not None else str(DEFAULT_ARCHIVE)
        self._device = resolve_device(self.device)
        self._loaded = _load_cached(self.archive, self._device)

    @property
    def model(self) -> PyramidNet:
        return self._loaded.model

    @property
    def trained_mip(self) -> int | None:
        """The MIP the archive was trained at (a stage at another MIP still runs; results may be worse)."""
        return self._loaded.mip

    def __call__(self, pair: Pair, init: Tensor | None = None) -> Tensor:
        h, w = pair.shape
        n = max(pair.src.shape[0], pair.tgt.shape[0], 1 if init is None else init.shape[0])
        out_device = pair.tgt.device
        dev = self._device
        src = pair.src.to(dev, torch.float32)
        tgt = pair.tgt.to(dev, torch.float32)
        if pair.src_defects is not None:
            src = src.masked_fill(pair.src_defects.to(dev) > 0, 0.0)
        if pair.tgt_defects is not None:
            tgt = tgt.masked_fill(pair.tgt_defects.to(dev) > 0, 0.0)
        src, tgt = src.expand(n, -1, -1, -1), tgt.expand(n, -1, -1, -1)
        hs, ws = src.shape[-2:]
        ox, oy = pair.offset
        pad = (ox, ws - w - ox, oy, hs - h - oy)
        if any(pad):  # run over the whole src window: tgt padded with "no tissue"
            tgt = F.pad(tgt, pad)
        init_win = None
        if init is not None:
            if init.dim() != 4 or init.shape[1] != 2 or tuple(init.shape[-2:]) != (h, w):
                raise ValueError(f"init must be (N, 2, {h}, {w}) over the target grid, got {tuple(init.shape)}")
            init_win = init.to(dev, torch.float32).expand(n, -1, -1, -1)
            if any(pad):  # extend the init field over the window with its edge values
                init_win = F.pad(init_win, pad, mode="replicate")
        out = []
        # no_grad, not inference_mode: fields.py caches its pixel grids per size (lru_cache), and a grid
        # first built under inference_mode is an inference tensor that breaks any later autograd use of
        # fields.warp in this process (the finetuner's, training's) at that size.
        with torch.no_grad():
            for i in range(0, n, self.batch_size):
                s, t = src[i:i + self.batch_size], tgt[i:i + self.batch_size]
                g = None if init_win is None else init_win[i:i + self.batch_size]
                if g is not None:
                    s = fields.warp(s, g)
                f = self.model(s, t)
                # a pair without tissue on either side has nothing to match: keep the init (or identity)
                empty = ((s > 0).flatten(1).any(1) & (t > 0).flatten(1).any(1)).logical_not()
                f = f.masked_fill(empty.view(-1, 1, 1, 1), 0.0)
                if g is not None:
                    f = fields.compose(f, g)
                out.append(f[..., oy:oy + h, ox:ox + w])
        return torch.cat(out).to(out_device)
