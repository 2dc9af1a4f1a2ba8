"""The bench prototypes' one way into the pair aligner: swap each estimator it builds for another.

bench/jitter.py, bench/soft_matching.py and bench/border_patches.py each change how block matching runs
without touching seamless_core: within `swapped_estimators(swap)`, multiscale.align_pair builds every
stage's estimator as usual and then uses `swap(estimator)` instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from seamless_core.estimators import multiscale


@contextlib.contextmanager
def swapped_estimators(swap: Callable[[Any], Any]) -> Iterator[None]:
    """Within the block, every estimator multiscale.align_pair builds is replaced by swap(estimator)."""
    build = multiscale.build_estimator

    def build_swapped(spec):  # noqa: ANN001, ANN202 - the same signature as spec.build_estimator
        return swap(build(spec))

    multiscale.build_estimator = build_swapped
    try:
        yield
    finally:
        multiscale.build_estimator = build
