"""Neuroglancer links for layers, and a tiny CORS file server so local (file://) layers can be viewed."""

from __future__ import annotations

import functools
import json
import os
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


def serve(root: str, port: int = DEFAULT_PORT) -> None:
    """Serve `root` on 127.0.0.1:`port` for Neuroglancer until interrupted."""
    handler = functools.partial(_CorsHandler, directory=os.path.abspath(root))
    with ThreadingHTTPServer(("127.0.0.1", port), handler) as server:
        server.serve_forever()
