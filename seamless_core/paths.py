"""Storage paths: which schemes work and how a bare local path becomes a URL (no heavy imports)."""

from __future__ import annotations

import os

from .errors import InputError

SUPPORTED_SCHEMES = ("file", "gs", "s3")


def normalise_path(path: str) -> str:
    """A CloudVolume path with an explicit scheme; bare local paths become file:// URLs."""
    if "://" not in path:
        return "file://" + os.path.abspath(path)
    scheme = path.split("://", 1)[0]
    if scheme not in SUPPORTED_SCHEMES:
        raise InputError(
            f"unsupported storage scheme {scheme!r} in {path!r}: use one of "
            + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        )
    return path.rstrip("/")
