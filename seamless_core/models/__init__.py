"""Trained model archives: the format (`archive`) and the archive committed with the package.

`DEFAULT_ARCHIVE` is the SEAMLeSS pyramid trained on the shared ISBI 2012 ssTEM sample at MIP 2
(see docs/pyramid.md for the command that made it). It ships as package data.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_ARCHIVE_NAME = "pyramid-isbi2012-v1"
DEFAULT_ARCHIVE: Path = Path(__file__).resolve().parent / DEFAULT_ARCHIVE_NAME

__all__ = ["DEFAULT_ARCHIVE", "DEFAULT_ARCHIVE_NAME"]
