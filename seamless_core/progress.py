"""Progress that reads well both on a terminal and in a file or an Airflow task log.

On a terminal: a tqdm bar. Elsewhere (a pod's log streamed into the Airflow task log): one line every
`interval` seconds with chunks done, rate, megapixels per second and ETA, so a user reading the task
log sees the step advance, and a final summary line.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger("seamless.progress")

DEFAULT_INTERVAL_S = 10.0


def default_interval() -> float:
    """Seconds between progress lines: env SEAMLESS_PROGRESS_INTERVAL, read when a step starts (a warm
    step server's child inherits its modules from the server, not its environment)."""
    return float(os.environ.get("SEAMLESS_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))


@dataclass
class StepReport:
    """What a step did: the figures its task log and the CLI's JSON report carry."""

    step: str
    chunks: int = 0
    megapixels: float = 0.0
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mpx_per_s(self) -> float:
        return self.megapixels / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "chunks": self.chunks,
            "megapixels": round(self.megapixels, 3),
            "seconds": round(self.seconds, 3),
            "mpx_per_s": round(self.mpx_per_s, 3),
            **self.details,
        }


def _format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts chunks and pixels of one step; see the module docstring for the two output styles."""

    def __init__(
        self,
        step: str,
        total: int,
        *,
        interval: float | None = None,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.report = StepReport(step)
        self.total = total
        self.interval = default_interval() if interval is None else interval
        self._stream = stream or sys.stderr
        use_bar = self._stream.isatty() if bar is None else bar
        self._bar = tqdm(total=total, desc=step, unit="chunk", file=self._stream) if use_bar else None
        self._start = time.perf_counter()
        self._last_line = self._start

    def advance(self, chunks: int = 1, pixels: int = 0) -> None:
        self.report.chunks += chunks
        self.report.megapixels += pixels / 1e6
        if self._bar is not None:
            self._bar.update(chunks)
            self._bar.set_postfix_str(f"{self._rate_mpx():.1f} Mpx/s", refresh=False)
            return
        now = time.perf_counter()
        if now - self._last_line >= self.interval:
            self._last_line = now
            log.info(self.line())

    def _rate_mpx(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.report.megapixels / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        done = self.report.chunks
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        pct = 100.0 * done / self.total if self.total else 100.0
        eta_text = _format_eta(eta) if eta == eta else "?"
        return (
            f"{self.report.step}: {done}/{self.total} chunks ({pct:.0f}%), {rate:.2f} chunks/s, "
            f"{self._rate_mpx():.1f} Mpx/s, ETA {eta_text}"
        )

    def close(self) -> StepReport:
        self.report.seconds = time.perf_counter() - self._start
        if self._bar is not None:
            self._bar.close()
        log.info(
            "%s: done, %d chunks, %.1f Mpx in %.2f s (%.1f Mpx/s)",
            self.report.step,
            self.report.chunks,
            self.report.megapixels,
            self.report.seconds,
            self.report.mpx_per_s,
        )
        return self.report
