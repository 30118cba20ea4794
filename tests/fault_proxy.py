"""A fault-injecting HTTP proxy for the tests: clients talk to it as to the S3 server it fronts (moto on loopback),
and it fails requests the way object stores fail in production.

* outages on a schedule: for ``outage_s`` seconds every ``every_s`` seconds, every request gets ``503 SlowDown`` or a
  reset connection (``mode`` "503", "reset" or "mixed");
* at other times, a share ``error_rate`` of requests fail at random: ``500 InternalError``, a reset before the
  request reaches the server, or a response cut off in the middle of its body;
* ``latency_s`` added before every GET;
* ``answer(method, path)`` (also settable later): return ``(status, code)`` to answer that request with the
  store's error (``(403, "InvalidObjectState")``: an archived object), or None to let it through; applied even
  with faults off;
* ``on_request(method, path, status)`` is called for each request the server answered, before the answer goes
  back to the client: the request took effect, and the client does not know yet (where a kill hurts most).

A request that fails never reaches the server, except a cut-off response (the server did the work; the client
never learns it). Counters in :attr:`stats`.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

S3_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
            '<RequestId>fault-proxy</RequestId></Error>')
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, *, every_s: float = 0.0, outage_s: float = 0.0, mode: str = "mixed",
                 error_rate: float = 0.0, latency_s: float = 0.0, seed: int = 0,
                 on_request: Callable[[str, str, int], None] | None = None,
                 answer: Callable[[str, str], tuple[int, str] | None] | None = None):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.every_s, self.outage_s, self.mode = every_s, outage_s, mode
        self.error_rate, self.latency_s, self.on_request, self.answer = error_rate, latency_s, on_request, answer
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.faults = False
        self.t0 = time.monotonic()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError):
                    self.close_connection = True

            def do_any(self) -> None:
                proxy.serve(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self, faults: bool = True) -> "FaultProxy":
        self.thread.start()
        self.set_faults(faults)
        return self

    def set_faults(self, on: bool) -> None:
        """Turn faults on (the outage schedule starts now) or off."""
        self.faults, self.t0 = on, time.monotonic()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def in_outage(self) -> bool:
        return bool(self.faults and self.every_s and (time.monotonic() - self.t0) % self.every_s < self.outage_s)

    def _fault(self) -> str | None:
        if not self.faults:
            return None
        with self.lock:
            if self.in_outage():
                return self.random.choice(["503", "reset"]) if self.mode == "mixed" else self.mode
            if self.random.random() < self.error_rate:
                return self.random.choice(["500", "reset", "cut"])
        return None

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        body = _read_body(handler)
        fault = self._fault()
        self.stats["requests"] += 1
        chosen = self.answer(handler.command, handler.path) if self.answer is not None else None
        if chosen is not None:
            self.stats[chosen[1]] += 1
            _error(handler, *chosen, f"{chosen[1]} (fault proxy)")
            return
        if fault in ("503", "500"):
            self.stats[fault] += 1
            code, message = ("SlowDown", "Please reduce your request rate.") if fault == "503" else (
                "InternalError", "We encountered an internal error. Please try again.")
            _error(handler, int(fault), code, message)
            return
        if fault == "reset":
            self.stats["reset"] += 1
            _reset(handler)
            return
        if self.latency_s and handler.command == "GET":
            time.sleep(self.latency_s)
        status, headers, payload = self._forward(handler, body)
        if fault == "cut" and handler.command == "GET" and len(payload) > 1:
            self.stats["cut"] += 1
            handler.send_response(status)
            for name, value in headers:
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(payload[: len(payload) // 2])
            handler.wfile.flush()
            _reset(handler)
            return
        self.stats["forwarded"] += 1
        if self.on_request is not None:
            self.on_request(handler.command, handler.path, status)
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(payload)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in HOP_BY_HOP}
            if body or handler.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}]
            length = response.getheader("Content-Length") if handler.command == "HEAD" else str(len(payload))
            return response.status, [*kept, ("Content-Length", length or "0")], payload
        finally:
            connection.close()


def _error(handler: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
    """Answer with an S3 error document."""
    payload = S3_ERROR.format(code=code, message=message).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/xml")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(payload)


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline().strip():  # trailers
                    pass
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def _reset(handler: BaseHTTPRequestHandler) -> None:
    """Close the client's connection with a TCP reset (RST), as a crashed server or a load balancer does."""
    handler.close_connection = True
    try:
        handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.connection.close()
    except OSError:
        pass
