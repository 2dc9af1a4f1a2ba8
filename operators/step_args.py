"""What both step operators (pod and local twin) share: the step as an argument list, retry defaults."""

from __future__ import annotations

from datetime import timedelta
from typing import Any


def checked_step(step: Any) -> list[str]:
    """The step's `seamless` arguments; a shell string is refused (no quoting, no injection)."""
    if isinstance(step, str) or not step or not all(isinstance(a, str) for a in step):
        raise TypeError("step must be a non-empty list of arguments, e.g. ['render', '--z', '12'], never a shell string")
    return list(step)


def with_retry_defaults(kwargs: dict[str, Any], retries: int) -> dict[str, Any]:
    """Exponential backoff from 30 s up to 10 min unless the caller set its own."""
    kwargs.setdefault("retries", retries)
    kwargs.setdefault("retry_delay", timedelta(seconds=30))
    kwargs.setdefault("retry_exponential_backoff", True)
    kwargs.setdefault("max_retry_delay", timedelta(minutes=10))
    return kwargs
