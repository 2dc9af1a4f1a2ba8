"""The model archive: a versioned folder holding `model.json` and `weights.safetensors`.

Layout (local folder, file:// or gs:// / s3:// prefix):

    <archive>/model.json          {"format": "seamless-model", "format_version": 1,
                                   "architecture": "seamless-pyramid", "config": {...layer sizes...},
                                   "mip": <MIP it was trained at>,
                                   "training": {"command", "data", "steps", "seconds", "final_losses",
                                                "seed", "torch", ...},
                                   "weights": {"file": "weights.safetensors", "sha256": "<hex>",
                                               "parameters": <count>}}
    <archive>/weights.safetensors  the state dict (float32), safetensors format (no pickle: loading an
                                   archive cannot run code)

`load_archive` checks everything a user could get wrong before returning a model: a missing archive,
an unknown format version or architecture, a weights file that does not match its recorded sha256 or
cannot be parsed (corrupt), and weights that do not fit the config. Each is an InputError that names
the archive. `save_archive` writes a local archive atomically (a temporary sibling folder renamed into
place); on object storage it uploads the weights first and model.json last, so a reader never sees a
model.json whose weights are missing (and the sha256 catches a half-replaced archive).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import InputError

FORMAT = "seamless-model"
FORMAT_VERSION = 1
MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"

# architecture name -> ("module:class of the nn.Module", "module:class of its config")
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "seamless-pyramid": ("seamless_core.estimators.pyramid:PyramidNet",
                         "seamless_core.estimators.pyramid:PyramidConfig"),
}

__all__ = ["LoadedModel", "load_archive", "save_archive", "resolve_archive_path", "read_manifest",
           "FORMAT", "FORMAT_VERSION", "ARCHITECTURES"]


@dataclass
class LoadedModel:
    """A validated archive: the model (eval mode, on its device) and its manifest."""

    path: str
    model: nn.Module
    config: dict[str, Any]
    mip: int | None
    manifest: dict[str, Any]


# --------------------------------------------------------------------------------------------------
# paths and bytes
# --------------------------------------------------------------------------------------------------
def resolve_archive_path(path: str | os.PathLike[str]) -> str:
    """A local absolute path for local archives (bare or file://), the URL otherwise."""
    text = str(path)
    if text.startswith("file://"):
        text = urlparse(text).path
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme not in ("gs", "s3"):
            raise InputError(f"model archive {text}: unsupported scheme {scheme!r}; use a local path, file://, "
                             "gs:// or s3://")
        return text.rstrip("/")
    return os.path.abspath(text)


def _is_local(resolved: str) -> bool:
    return "://" not in resolved


def _get(resolved: str, name: str) -> bytes | None:
    if _is_local(resolved):
        p = Path(resolved) / name
        return p.read_bytes() if p.is_file() else None
    from cloudfiles import CloudFiles

    from ..volumes import storage_secrets

    return CloudFiles(resolved, secrets=storage_secrets(resolved)).get(name)


def _module_attr(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """model.json of an archive, with format, version and architecture checked."""
    resolved = resolve_archive_path(path)
    raw = _get(resolved, MODEL_FILE)
    if raw is None:
        what = "does not exist" if _is_local(resolved) and not Path(resolved).exists() else f"has no {MODEL_FILE}"
        raise InputError(f"model archive {resolved} {what}: give the folder written by `seamless train` "
                         f"(it holds {MODEL_FILE} and {WEIGHTS_FILE}), or leave the archive unset for the "
                         "packaged default")
    try:
        manifest = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"model archive {resolved} is corrupt ({MODEL_FILE} is not JSON: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise InputError(f"model archive {resolved}: {MODEL_FILE} is not a {FORMAT!r} manifest (format {got!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise InputError(f"model archive {resolved} has format_version {version!r}, but this version of seamless "
                         f"reads format_version {FORMAT_VERSION}; re-export or retrain it with this version")
    arch = manifest.get("architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"model archive {resolved} has unknown architecture {arch!r}; known: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    weights = manifest.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise InputError(f"model archive {resolved} is corrupt ({MODEL_FILE} lacks weights.sha256)")
    mip = manifest.get("mip")
    if mip is not None and (not isinstance(mip, int) or mip < 0):
        raise InputError(f"model archive {resolved}: mip must be a non-negative integer, got {mip!r}")
    return manifest


def load_archive(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedModel:
    """Read, verify and instantiate an archive; the model is in eval mode on `device`."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    resolved = resolve_archive_path(path)
    manifest = read_manifest(resolved)
    weights_info = manifest["weights"]
    name = weights_info.get("file", WEIGHTS_FILE)
    if not isinstance(name, str) or "/" in name or name.startswith("."):
        raise InputError(f"model archive {resolved} is corrupt (weights file name {name!r})")
    data = _get(resolved, name)
    if data is None:
        raise InputError(f"model archive {resolved} is corrupt ({name} is missing)")
    digest = _sha256(data)
    if digest != weights_info["sha256"]:
        raise InputError(f"model archive {resolved} is corrupt ({name} has sha256 {digest[:16]}..., "
                         f"{MODEL_FILE} records {weights_info['sha256'][:16]}...); copy it again")
    try:
        state = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InputError(f"model archive {resolved} is corrupt ({name} is not a readable safetensors "
                         f"file: {exc})") from None
    model_cls, config_cls = (_module_attr(s) for s in ARCHITECTURES[manifest["architecture"]])
    try:
        config = config_cls.from_dict(manifest.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise InputError(f"model archive {resolved}: invalid config for {manifest['architecture']} ({exc})") from None
    model = model_cls(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise InputError(f"model archive {resolved}: weights do not match the config ({detail[:400]})") from None
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise InputError(f"model archive {resolved} is corrupt (weights hold NaN or inf)")
    model.eval().requires_grad_(False)
    model.to(torch.device(device))
    return LoadedModel(path=resolved, model=model, config=config.to_dict(), mip=manifest.get("mip"),
                       manifest=manifest)


# --------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------
def save_archive(path: str | os.PathLike[str], model: nn.Module, config: dict[str, Any], training: dict[str, Any],
                 *, mip: int | None, architecture: str = "seamless-pyramid") -> dict[str, Any]:
    """Write `model`'s weights and manifest as an archive at `path`; returns the manifest."""
    from safetensors.torch import save as save_safetensors

    if architecture not in ARCHITECTURES:
        raise InputError(f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    resolved = resolve_archive_path(path)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(state, metadata={"format": FORMAT, "architecture": architecture})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "config": config,
        "mip": mip,
        "training": training,
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(data),
                    "parameters": int(sum(v.numel() for v in state.values()))},
    }
    text = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    if _is_local(resolved):
        _write_local_atomic(Path(resolved), {WEIGHTS_FILE: data, MODEL_FILE: text})
    else:
        from cloudfiles import CloudFiles

        from ..volumes import storage_secrets

        cf = CloudFiles(resolved, secrets=storage_secrets(resolved))
        cf.put(WEIGHTS_FILE, data, compress=None, content_type="application/octet-stream")
        cf.put(MODEL_FILE, text, compress=None, content_type="application/json")
    return manifest


def _write_local_atomic(dest: Path, files: dict[str, bytes]) -> None:
    """Write files into a temporary sibling folder, then rename it over `dest`.

    A reader sees the old archive or the new one; if the process dies between the two renames (old moved
    aside, new not yet in place) the old archive survives as `.<name>.old-*` beside it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = dest.parent / f".{dest.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{tag}"
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
