"""A task's step figures, read from its own output and returned as the task's XCom (`return_value`).

Every `seamless` step ends by printing its report as one JSON line (docs/cli.md: chunks, megapixels,
seconds, Mpx/s, step-specific figures). Both operators already read that output (the local twin from
its child's stdout, the pod operator from the container log it streams), so the figures reach XCom
without an xcom sidecar, pods/exec or the worker reading storage. The report carries what the task log
already shows (layer paths, counts, timings), never credentials.
"""

from __future__ import annotations

import json
from typing import Any


def step_report(line: str) -> dict[str, Any] | None:
    """The report a `seamless` step printed on this line, or None for any other line."""
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and isinstance(data.get("step"), str) else None


class StepFigures:
    """Collects the reports of one task's steps (a fused task runs several), in the order they ran."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def feed(self, line: str) -> None:
        report = step_report(line)
        if report is not None:
            self.reports.append(report)

    def xcom(self) -> dict[str, Any] | None:
        """{"steps": [report, ...]} for XCom, or None when no step ran (every step was already done)."""
        return {"steps": list(self.reports)} if self.reports else None
