"""A fault-injecting HTTP proxy for storage tests: stdlib only, on 127.0.0.1, in front of a real server.

Why a proxy and not a mock: the faults must reach the real client stack (google-cloud-storage, its
`requests`/urllib3 transport, cloud-files, CloudVolume, seamless_core.volumes) exactly as a flaky
network or an overloaded GCS would deliver them: an HTTP status, a socket closed half-way through a
body, a response that trickles in.

The schedule is seeded and keyed per request target (method + object), not per arrival order, so the
same seed injects the same faults whatever order a client's threads send their requests in: attempt
`n` of target `k` gets fault `plan(k)[n]` and every later attempt passes. Each target therefore faults
at most `max_per_target` times, and a client that retries enough always gets through.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

TRANSIENT_STATUS = {"429": 429, "500": 500, "503": 503}
# "drop": the request reaches the server (a write happens) but the response is cut after its headers
# and half its body; "reset": the connection closes before the request is forwarded; "slow": the
# response is held, then its body trickles in small pieces.
KINDS = (*TRANSIENT_STATUS, "drop", "reset", "slow")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length"}


@dataclass(frozen=True)
class Schedule:
    """Which requests fail, and how: seeded, per target, reproducible."""

    seed: int = 0
    rate: float = 0.0  # share of targets that get at least one fault
    kinds: tuple[str, ...] = KINDS
    max_per_target: int = 2
    latency_s: tuple[float, float] = (0.0, 0.0)  # extra delay on every forwarded request
    slow_s: float = 0.3  # total hold + trickle time of a "slow" response
    applies: Callable[[str, str], bool] = lambda method, target: True  # which targets may fault

    def plan(self, method: str, target: str) -> list[str]:
        """The faults the first attempts at `target` get, in order (empty: it never faults)."""
        if not self.rate or not self.applies(method, target):
            return []
        digest = hashlib.sha256(f"{self.seed}|{method}|{target}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        if rng.random() >= self.rate:
            return []
        return [rng.choice(self.kinds) for _ in range(rng.randint(1, self.max_per_target))]


@dataclass(frozen=True)
class Permanent:
    """Every matching request is refused with `status` (403: no permission, 404: gone), forever."""

    status: int
    matches: Callable[[str, str], bool]


@dataclass
class Stats:
    """What the proxy saw and did, per target ("METHOD object")."""

    requests: int = 0
    injected: Counter[str] = field(default_factory=Counter)  # faults by kind
    attempts: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)  # failures injected (every kind but "slow"), by target
    served: set[str] = field(default_factory=set)  # targets answered in full at least once
    refused: Counter[str] = field(default_factory=Counter)  # permanent refusals, by target

    @property
    def faults(self) -> int:
        return sum(self.injected.values())

    @property
    def recovered(self) -> int:
        """Failures after which the client asked again and was answered: each one a retry that worked."""
        return sum(n for target, n in self.failed.items() if target in self.served)

    def unrecovered(self) -> list[str]:
        """Targets that failed and were never asked for again successfully."""
        return sorted(target for target in self.failed if target not in self.served)


def request_target(method: str, path: str, body: bytes) -> str:
    """`METHOD object-name` for GCS JSON-API requests; the path for anything else.

    A multipart upload names its object in the body's JSON part, a media download in the URL path.
    """
    parts = urlsplit(path)
    query = parse_qs(parts.query)
    if "name" in query:
        return query["name"][0]
    if parts.path.startswith("/upload/") and body:
        match = re.search(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"', body)
        if match:
            return json.loads(b'"' + match.group(1) + b'"')
    found = re.match(r"^/(?:download/)?storage/v1/b/[^/]+/o/(.+)$", parts.path)
    return unquote(found.group(1)) if found else parts.path


class FaultProxy:
    """Forward HTTP/1.1 requests to `upstream` (http://host:port), injecting faults by `schedule`."""

    def __init__(self, upstream: str, schedule: Schedule | None = None) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.schedule = schedule or Schedule()
        self.permanent: list[Permanent] = []
        self.stats = Stats()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def reset(self, schedule: Schedule | None = None, permanent: list[Permanent] | None = None) -> Stats:
        """A new schedule and fresh counters; returns the previous counters."""
        with self._lock:
            previous, self.stats = self.stats, Stats()
            self.schedule = schedule or Schedule()
            self.permanent = list(permanent or [])
        return previous

    def _decide(self, method: str, target: str) -> str | int | None:
        with self._lock:
            self.stats.requests += 1
            for rule in self.permanent:
                if rule.matches(method, target):
                    self.stats.refused[f"{method} {target}"] += 1
                    return rule.status
            key = f"{method} {target}"
            attempt = self.stats.attempts[key]
            self.stats.attempts[key] += 1
            plan = self.schedule.plan(method, target)
            fault = plan[attempt] if attempt < len(plan) else None
            if fault is not None:
                self.stats.injected[fault] += 1
            if fault is None or fault == "slow":
                self.stats.served.add(key)  # it will be answered in full (slowly, for "slow")
            else:
                self.stats.failed[key] += 1
            return fault

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet by design
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    data = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if not size:
                            return data
                        data += chunk
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _handle(self) -> None:
                body = self._body()
                target = request_target(self.command, self.path, body)
                fault = proxy._decide(self.command, target)
                if isinstance(fault, int):  # a permanent refusal
                    self._reply_error(fault, "Forbidden" if fault == 403 else "Not Found")
                    return
                if fault in TRANSIENT_STATUS:
                    self._reply_error(TRANSIENT_STATUS[str(fault)], "injected transient fault")
                    return
                if fault == "reset":
                    self._abort()
                    return
                low, high = proxy.schedule.latency_s
                if high:
                    time.sleep(random.uniform(low, high))
                status, reason, headers, payload = self._forward(body)
                if fault == "drop":
                    self._send_head(status, reason, headers, len(payload))
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self._abort()
                    return
                if fault == "slow":
                    self._trickle(status, reason, headers, payload, proxy.schedule.slow_s)
                    return
                self._send_head(status, reason, headers, len(payload))
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

            def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                    kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP]
                    return response.status, response.reason, kept, payload
                finally:
                    conn.close()

            def _send_head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int) -> None:
                self.send_response_only(status, reason)
                for key, value in headers:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(length))
                self.end_headers()

            def _reply_error(self, status: int, message: str) -> None:
                payload = json.dumps({"error": {"code": status, "message": message,
                                                "errors": [{"message": message, "reason": "injected"}]}}).encode()
                self._send_head(status, http.client.responses.get(status, ""), [("Content-Type", "application/json")],
                                len(payload))
                self.wfile.write(payload)

            def _trickle(self, status: int, reason: str, headers: list[tuple[str, str]], payload: bytes,
                         seconds: float) -> None:
                time.sleep(seconds / 2)
                self._send_head(status, reason, headers, len(payload))
                pieces = 8
                step = max(1, -(-len(payload) // pieces))
                for start in range(0, len(payload), step):
                    self.wfile.write(payload[start : start + step])
                    self.wfile.flush()
                    time.sleep(seconds / 2 / pieces)

            def _abort(self) -> None:
                """Close the socket at once (RST where the OS allows): the client sees a dropped connection."""
                self.close_connection = True
                try:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        return Handler
