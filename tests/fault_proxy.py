"""A fault-injecting HTTP proxy in front of the tests' loopback S3 endpoint (moto's server).

Requests pass through unchanged unless a `Fault` rule matches them; a rule then answers the way a
struggling store does: 503 SlowDown, 500 InternalError or 403 AccessDenied with S3's XML error body,
a connection reset part-way through the body, or a body that trickles out slowly. Rules count the
requests they see, so "the 2nd GET of this key" and "the first 3 PUTs of that marker" are exact, and
a test can assert that each fault really fired.

The proxy is a thread of the test process (never a fork), listens on 127.0.0.1 only, gives every
upstream call a timeout, and stops when its `with` block ends (or after `lifetime` seconds).
Ray workers reach it over loopback like any endpoint: `storage_options={"client_kwargs":
{"endpoint_url": proxy.url}}`.
"""

from __future__ import annotations

import http.client
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# kind -> (status, S3 error code, message) of the error responses a rule can give
_ERRORS = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "denied": (403, "AccessDenied", "Access Denied"),
}
_BODY_FAULTS = ("reset", "slow")
# hop-by-hop headers a proxy does not forward (RFC 9110 7.6.1), plus the ones it recomputes
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
                "expect", "content-length", "host"}
_UPSTREAM_TIMEOUT_S = 30.0


@dataclass
class Fault:
    """Answer requests of `method` whose unquoted path matches the regex `path` with `kind`.

    The first `after` matching requests pass; the next `times` get the fault (None: every one after).
    `slow` bodies are sent in `chunk` bytes every `delay` seconds."""

    method: str
    path: str
    kind: str
    times: int | None = 1
    after: int = 0
    delay: float = 0.05
    chunk: int = 4096
    seen: int = 0
    fired: int = 0
    _pattern: re.Pattern = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in _ERRORS and self.kind not in _BODY_FAULTS:
            raise ValueError(f"unknown fault kind {self.kind!r}: one of {sorted(_ERRORS) + list(_BODY_FAULTS)}")
        self._pattern = re.compile(self.path)

    def due(self, method: str, path: str) -> bool:
        """Counts a matching request; whether the rule would fault it (the caller holds the lock)."""
        if method != self.method or not self._pattern.search(path):
            return False
        self.seen += 1
        return self.seen > self.after and (self.times is None or self.fired < self.times)


class FaultProxy:
    """`with FaultProxy(upstream_url) as proxy:` a loopback proxy; `proxy.add(Fault(...))` adds rules."""

    def __init__(self, upstream: str, lifetime: float = 900.0) -> None:
        parts = urlsplit(upstream)
        if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"the fault proxy forwards to loopback endpoints only, not {upstream}")
        self.upstream = (parts.hostname, parts.port or 80)
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.Lock()
        self.lifetime = lifetime
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._timer = threading.Timer(lifetime, self.stop)
        self._timer.daemon = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def count(self, method: str, path: str) -> int:
        """Requests seen so far of `method` whose path matches the regex `path`."""
        pattern = re.compile(path)
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and pattern.search(p))

    def fault_for(self, method: str, path: str) -> Fault | None:
        """The rule that faults this request (the first one due; every matching rule counts it)."""
        with self.lock:
            self.requests.append((method, path))
            due = [f for f in self.faults if f.due(method, path)]
            if due:
                due[0].fired += 1
            return due[0] if due else None

    def start(self) -> FaultProxy:
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._thread.join(timeout=10)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(_ProxyHandler):
        """A handler class per proxy (the server instantiates it per request)."""

    Handler.proxy = proxy
    return Handler


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the S3 client expects
    timeout = _UPSTREAM_TIMEOUT_S  # a client that stalls does not hold a thread forever
    proxy: FaultProxy

    def do_GET(self) -> None:
        self._forward()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # the test's own assertions say what happened; per-request lines would only be noise

    def _forward(self) -> None:
        body = self._request_body()
        fault = self.proxy.fault_for(self.command, unquote(urlsplit(self.path).path))
        if fault is not None and fault.kind in _ERRORS:
            self._send_error_response(*_ERRORS[fault.kind])
            return
        status, reason, headers, payload, length = self._upstream(body)
        self.send_response_only(status, reason)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(length if self.command == "HEAD" else len(payload)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind == "reset":
            self._reset_after(payload[: len(payload) // 2])
        elif fault is not None and fault.kind == "slow":
            self._trickle(payload, fault.chunk, fault.delay)
        else:
            self.wfile.write(payload)

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise ValueError("the fault proxy forwards Content-Length bodies only; s3fs sends no chunked bodies")
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _upstream(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes, int]:
        """The upstream's answer: status, reason, end-to-end headers, body, declared Content-Length."""
        host, port = self.proxy.upstream
        conn = http.client.HTTPConnection(host, port, timeout=_UPSTREAM_TIMEOUT_S)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
            headers["Host"] = f"{host}:{port}"
            conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                         headers=headers)
            response = conn.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS]
            length = int(response.getheader("Content-Length") or len(payload))
            return response.status, response.reason, kept, payload, length
        finally:
            conn.close()

    def _send_error_response(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{self.path}</Resource><RequestId>fault-proxy</RequestId></Error>").encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset_after(self, part: bytes) -> None:
        """Send part of the body, then drop the connection with a TCP RST, as a dying peer does."""
        self.wfile.write(part)
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def _trickle(self, payload: bytes, chunk: int, delay: float) -> None:
        for start in range(0, len(payload), chunk):
            self.wfile.write(payload[start : start + chunk])
            self.wfile.flush()
            time.sleep(delay)
