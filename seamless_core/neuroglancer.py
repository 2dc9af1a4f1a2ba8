"""Neuroglancer links for layers, and a tiny CORS file server so local (file://) layers can be viewed."""

from __future__ import annotations

import functools
import json
import os
import threading
import urllib.parse
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

VIEWER = "https://neuroglancer-demo.appspot.com"
DEFAULT_PORT = 1337


def layer_source(path: str, serve_root: str | None = None, port: int = DEFAULT_PORT) -> str:
    """A Neuroglancer source for a layer path; file:// layers are reached through `seamless serve`."""
    if path.startswith("file://"):
        local = path[len("file://"):]
        root = os.path.abspath(serve_root or os.path.dirname(local))
        rel = os.path.relpath(local, root)
        return f"precomputed://http://127.0.0.1:{port}/{urllib.parse.quote(rel)}"
    return f"precomputed://{path}"


def viewer_link(layers: list[tuple[str, str]], *, position: tuple[float, float, float] | None = None,
                serve_root: str | None = None, port: int = DEFAULT_PORT) -> str:
    """A viewer URL showing `layers` ((name, path) pairs) side by side."""
    state: dict[str, object] = {
        "layers": [{"type": "image", "source": layer_source(p, serve_root, port), "name": n} for n, p in layers],
        "layout": "xy",
    }
    if position is not None:
        state["position"] = list(position)
    return f"{VIEWER}/#!" + urllib.parse.quote(json.dumps(state, separators=(",", ":")), safe="")



def local_root(paths: list[str]) -> str | None:
    """The folder `seamless serve` must serve so that every file:// path is below it (None: no local path)."""
    local = [p[len("file://"):] for p in paths if p.startswith("file://")]
    if not local:
        return None
    return os.path.dirname(local[0]) if len(local) == 1 else os.path.commonpath(local)


def section_link(layers: list[tuple[str, str]], z: int, *, bbox: tuple[int, int, int, int] | None = None,
                 serve_root: str | None = None, port: int = DEFAULT_PORT) -> str:
    """A viewer URL at section `z` of `layers`, centred on `bbox` (x0, y0, x1, y1 at MIP 0).

    Built from paths and numbers only, no storage read. Neuroglancer takes a position for all axes or
    none, so without a bbox (the section's extent is in the layer's info, i.e. in storage) the viewer
    opens at the volume's centre. z + 0.5 is the centre of voxel z. Local layers are served from their
    common folder (`local_root`).
    """
    position = None
    if bbox is not None:
        x0, y0, x1, y1 = bbox
        position = ((x0 + x1) / 2, (y0 + y1) / 2, z + 0.5)
    root = serve_root if serve_root is not None else local_root([path for _, path in layers])
    return viewer_link(layers, position=position, serve_root=root, port=port)


def link_state(url: str) -> dict:
    """The Neuroglancer state a viewer URL carries (the JSON after `#!`)."""
    _, sep, fragment = url.partition("#!")
    if not sep:
        raise ValueError(f"not a Neuroglancer state URL (no '#!'): {url[:80]}")
    return json.loads(urllib.parse.unquote(fragment))

class _CorsHandler(SimpleHTTPRequestHandler):
    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def send_head(self):  # precomputed chunks are stored gzipped with a .gz suffix
        path = self.translate_path(self.path)
        if not os.path.exists(path) and os.path.exists(path + ".gz"):
            self.path += ".gz"
            self._gzip = True
        else:
            self._gzip = False
        return super().send_head()

    def send_header(self, keyword: str, value: str) -> None:
        if keyword == "Content-type" and getattr(self, "_gzip", False):
            super().send_header("Content-Encoding", "gzip")
            value = "application/octet-stream"
        super().send_header(keyword, value)


class _StoppableServer(ThreadingHTTPServer):
    """A server that a SIGTERM or Ctrl-C stops even while it is accepting a connection.

    socketserver reports any Exception raised while a request is handed to its thread and keeps
    serving; a signal handler's exception raised on the main thread at that moment would be swallowed.
    """

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        if threading.current_thread() is threading.main_thread():
            raise  # a signal (or a failure to start a thread) on the serving thread: stop, do not log and go on
        super().handle_error(request, client_address)


def serve(root: str, port: int = DEFAULT_PORT) -> None:
    """Serve `root` on 127.0.0.1:`port` for Neuroglancer until interrupted."""
    handler = functools.partial(_CorsHandler, directory=os.path.abspath(root))
    with _StoppableServer(("127.0.0.1", port), handler) as server:
        server.serve_forever()
