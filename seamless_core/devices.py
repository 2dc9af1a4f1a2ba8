"""Choosing the torch device: explicit, validated before any work, never a silent CPU fallback."""

from __future__ import annotations

import re

import torch

from .errors import InputError

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?|auto)$")


def resolve_device(name: str) -> torch.device:
    """Turn --device into a torch.device; `auto` takes CUDA when present, else the CPU."""
    if not _DEVICE.match(name or ""):
        raise InputError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(
                f"--device {name} was asked for, but torch {torch.__version__} sees no CUDA device here; "
                "use --device cpu or run on a GPU node"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)
