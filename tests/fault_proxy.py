"""An HTTP proxy on loopback, between the project and the S3 server, that injects faults on a schedule.

Written here rather than taken from a library: the proxies that can run here either work at the TCP level
(they cannot answer an S3 ``503 SlowDown``) or are whole interception suites; this one is the standard
library's threaded HTTP server, forwarding each request to the upstream server on a fresh connection.

It runs in its own process (``python tests/fault_proxy.py UPSTREAM PORT``) so that Ray's workers reach it
through ``AWS_ENDPOINT_URL`` like any S3 endpoint. With no schedule it passes everything through. The
test drives it through a control path no S3 request can use (``__proxy__`` is not a valid bucket name):

* ``POST /__proxy__/schedule`` with a JSON list of rules sets the schedule and zeroes the counts;
* ``GET /__proxy__/counts``: ``{"requests": {kind: n}, "injected": {fault: n}}`` since then.

A rule: ``{"fault": F, "kind": K, "every": N, "key": S, "limit": M, "delay_s": D}``. ``fault``: ``503``
(``SlowDown``), ``500`` (``InternalError``), ``reset_get`` (the headers and half of an object's body, then a
connection reset), ``reset_part`` (half of a multipart part's body read, then a reset), ``slow`` (the answer
``delay_s`` late). ``kind``: one of :func:`request_kind`'s, or ``any``. The rule fires on every ``N``-th request
it matches (``every: 1``: all of them); ``key``: only requests whose path holds this text; ``limit``: at most this many
times (none: for ever, a persistent fault). The first rule that fires decides a request.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

CONTROL = "/__proxy__/"
ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<Resource>{resource}</Resource><RequestId>fault-proxy</RequestId></Error>"
)
ERRORS = {
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
}
ONLY_KIND = {"reset_get": "get", "reset_part": "put_part"}  # faults that only some requests can have
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


def request_kind(method: str, path: str) -> str:
    """What an S3 request (path-style addressing) does: ``get``, ``head``, ``put``, ``put_part``, ``complete``
    (CompleteMultipartUpload), ``list`` (a bucket's listing) or ``other``."""
    parts = urlsplit(path)
    query = parse_qs(parts.query, keep_blank_values=True)
    is_object = "/" in parts.path.strip("/")  # bucket/key, not a bucket
    if method == "GET" and not is_object and parts.path.strip("/") and not query.keys() - {"list-type", "prefix",
            "delimiter", "max-keys", "continuation-token", "start-after", "encoding-type", "fetch-owner"}:  # fmt: skip
        return "list"
    if method in ("GET", "HEAD") and is_object and not query.keys() - {"partNumber", "versionId"}:
        return method.lower()
    if method == "PUT" and is_object:
        return "put_part" if "partNumber" in query and "uploadId" in query else "put"
    if method == "POST" and is_object and "uploadId" in query:
        return "complete"
    return "other"


class Schedule:
    """The rules and what they counted; shared by the handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.set([])

    def set(self, rules: list[dict]) -> None:
        with self.lock:
            self.rules = [dict(r, seen=0, fired=0) for r in rules]
            self.requests, self.injected = Counter(), Counter()

    def decide(self, kind: str, path: str) -> dict | None:
        with self.lock:
            self.requests[kind] += 1
            for rule in self.rules:
                if rule.get("kind", "any") not in ("any", kind) or rule.get("key", "") not in path:
                    continue
                if ONLY_KIND.get(rule["fault"], kind) != kind:
                    continue
                if rule.get("limit") is not None and rule["fired"] >= rule["limit"]:
                    continue
                rule["seen"] += 1
                if rule["seen"] % rule.get("every", 1) == 0:
                    rule["fired"] += 1
                    self.injected[rule["fault"]] += 1
                    return rule
            return None

    def counts(self) -> dict:
        with self.lock:
            return {"requests": dict(self.requests), "injected": dict(self.injected)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "100 Continue" answered for clients that expect it
    disable_nagle_algorithm = True  # headers and body are two writes: with Nagle, each answer waits for an ACK
    upstream: tuple[str, int]
    schedule: Schedule

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reset(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0), not an orderly close."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()
        self.wfile.close()
        self.connection.close()
        self.wfile = io.BytesIO()  # for the server's flush after the handler returns

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: bool = False) -> None:
        self.send_response_only(status)
        length = str(len(body))
        for name, value in headers:
            if name.lower() == "content-length" and self.command == "HEAD":
                length = value  # a HEAD's answer gives the object's length, without the body
            elif name.lower() not in HOP_HEADERS and name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body[: len(body) // 2] if cut else body)
        if cut:
            self._reset()

    def _control(self) -> None:
        if self.command == "POST" and self.path == CONTROL + "schedule":
            self.schedule.set(json.loads(self._body() or b"[]"))
            answer = b"{}"
        else:
            answer = json.dumps(self.schedule.counts()).encode()
        self._send(200, [("Content-Type", "application/json")], answer)

    def _handle(self) -> None:
        if self.path.startswith(CONTROL):
            return self._control()
        kind = request_kind(self.command, self.path)
        rule = self.schedule.decide(kind, urlsplit(self.path).path)
        fault = rule["fault"] if rule else None
        if os.environ.get("FAULT_PROXY_LOG"):
            print(f"fault proxy: {self.command} {self.path} {kind} {fault}", file=sys.stderr, flush=True)
        if fault == "reset_part":  # half the part's body read, then the connection dropped under the sender
            # the AWS SDK sends parts chunked (aws-chunked inside HTTP chunks): no Content-Length, the decoded one
            length = self.headers.get("Content-Length") or self.headers.get("x-amz-decoded-content-length") or 0
            self.rfile.read(int(length) // 2)
            return self._reset()
        body = self._body()
        if fault in ERRORS:
            status, code, message = ERRORS[fault]
            error = ERROR_BODY.format(code=code, message=message, resource=urlsplit(self.path).path).encode()
            return self._send(status, [("Content-Type", "application/xml")], error)
        if fault == "slow":
            time.sleep(float(rule.get("delay_s", 2.0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS | {"content-length"}}
        if body or self.command in ("PUT", "POST"):
            headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self._send(response.status, response.getheaders(), data, cut=fault == "reset_get" and len(data) > 1)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle


def serve(upstream: str, port: int) -> None:
    parts = urlsplit(upstream)
    Handler.upstream = (parts.hostname, parts.port or 80)
    Handler.schedule = Schedule()
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.serve_forever()


class FaultProxy:
    """The proxy in a process of its own, in front of ``upstream``; ``endpoint`` is where clients point."""

    def __init__(self, upstream: str, port: int):
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, __file__, upstream, str(port)])
        deadline = time.time() + 30
        while True:
            try:
                self.counts()
                return
            except OSError:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the fault proxy did not answer on {self.endpoint}") from None
                time.sleep(0.1)

    def _call(self, path: str, data: bytes | None = None):
        request = urllib.request.Request(self.endpoint + CONTROL + path, data=data, method="POST" if data else "GET")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def set_schedule(self, rules: list[dict]) -> None:
        """Replace the schedule (``[]``: pass everything through) and zero the counts."""
        self._call("schedule", json.dumps(rules).encode())

    def counts(self) -> dict:
        return self._call("counts")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
