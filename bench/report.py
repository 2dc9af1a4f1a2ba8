"""Shared by the benchmarks: rewrite one marked section of a markdown page, or append it."""

from __future__ import annotations

import re
from pathlib import Path


def write_section(path: Path, name: str, heading: str, text: str) -> None:
    """Replace the text between <!-- NAME:start --> and <!-- NAME:end -->, or append it under `heading`."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else ""
    block = f"{start}\n{text}\n{end}"
    if start in doc:
        doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
    else:
        doc += f"\n## {heading}\n\n{block}\n"
    path.write_text(doc)


RESULTS = Path(__file__).resolve().parent / "results"


def save_results(name: str, data: dict) -> Path:
    """Keep a benchmark's figures as JSON in bench/results/NAME.json (bench/scaling.py derives docs/scaling.md from them)."""
    import datetime
    import json
    import os

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"date": datetime.date.today().isoformat(), "load_avg_at_save": round(os.getloadavg()[0], 2), **data}
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path
