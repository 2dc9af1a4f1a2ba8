"""Restart markers: a finished step leaves a small JSON file; a rerun with the same inputs skips it.

A step's input hash covers its whole command line (paths and parameters) and the run ids of the
markers of the steps it waited for, so a step is redone exactly when its parameters changed or when
something upstream was redone since (a forced or changed upstream step writes a new run id).
Markers are written after the step's last chunk, whole or not at all (volumes.put_whole), on file://,
gs:// and s3:// alike; a killed step leaves no marker and is simply run again.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from cloudfiles import CloudFiles
from cloudvolume.lib import jsonify

from .errors import InputError
from .volumes import put_whole, storage_secrets, with_retries


def _split(url: str) -> tuple[CloudFiles, str]:
    folder, name = posixpath.split(url)
    return CloudFiles(folder, secrets=storage_secrets(folder)), name


def read_marker(url: str) -> dict[str, Any] | None:
    files, name = _split(url)
    data = with_retries(lambda: files.get_json(name), f"reading marker {url}")
    return data if isinstance(data, dict) else None


def delete_marker(url: str) -> None:
    files, name = _split(url)
    with_retries(lambda: files.delete(name), f"deleting marker {url}")


def inputs_hash(args: list[str], upstream_run_ids: list[str]) -> str:
    payload = json.dumps({"args": list(args), "upstream": list(upstream_run_ids)}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class MarkedStep:
    """A step's marker, the markers it waits for, and its own arguments."""

    marker: str
    upstream: tuple[str, ...]
    args: tuple[str, ...]

    def upstream_run_ids(self) -> list[str]:
        """Run ids of the upstream markers; a missing one means the order was broken."""
        ids = []
        for url in self.upstream:
            data = read_marker(url)
            if data is None:
                raise InputError(f"upstream step {posixpath.basename(url).removesuffix('.json')} has not finished "
                                 f"(no marker at {url}); run it first")
            ids.append(str(data["run_id"]))
        return ids

    def current_hash(self) -> str:
        return inputs_hash(list(self.args), self.upstream_run_ids())

    def done_record(self, wanted_hash: str | None = None) -> dict[str, Any] | None:
        """The marker's record when the step is done with these inputs (its report included), else None."""
        data = read_marker(self.marker)
        done = data is not None and data.get("inputs_hash") == (wanted_hash or self.current_hash())
        return data if done else None

    def is_done(self, wanted_hash: str | None = None) -> bool:
        return self.done_record(wanted_hash) is not None

    def finish(self, wanted_hash: str, seconds: float, report: dict[str, Any] | None = None) -> dict[str, Any]:
        data = {
            "inputs_hash": wanted_hash,
            "run_id": uuid.uuid4().hex,
            "args": list(self.args),
            "upstream": list(self.upstream),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "seconds": round(seconds, 3),
            "host": socket.gethostname(),
            "report": report or {},
        }
        folder, name = posixpath.split(self.marker)
        put_whole(folder, name, jsonify(data).encode(), f"writing marker {self.marker}")  # never torn
        return data
