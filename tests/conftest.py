"""Shared fixtures: real precomputed layers on disk built from the shared ssTEM sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


def sample_section(z: int = 0) -> np.ndarray:
    """One real 512x512 uint8 ssTEM section (the shared sample), or a clear skip if it is absent."""
    path = SAMPLE / f"{z}.png"
    if not path.exists():
        pytest.skip(f"shared sample not found at {SAMPLE}; clone with ../shared beside the checkout")
    return np.asarray(Image.open(path))


@pytest.fixture
def section() -> np.ndarray:
    return sample_section(0)


@pytest.fixture
def sample_dir() -> Path:
    if not SAMPLE.exists():
        pytest.skip(f"shared sample not found at {SAMPLE}")
    return SAMPLE
