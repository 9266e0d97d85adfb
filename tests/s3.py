"""A real S3 endpoint on loopback for tests: moto's ThreadedMotoServer, plus a fault-injecting HTTP proxy.

The proxy forwards every request to the moto server unchanged and can be told to answer the next N requests
with an error status, to delay them, to cut the body short, or to drop the connection: the faults a real
object store and network produce.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.faults: list[tuple[str, float]] = []  # (kind, argument), consumed one per request
        self.requests = 0
        self.faults_fired = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    fault = proxy.faults.pop(0) if proxy.faults else None
                    proxy.faults_fired += fault is not None
                if fault and fault[0] == "status":
                    self.send_response(int(fault[1]))
                    code = {403: "AccessDenied", 404: "NoSuchKey", 503: "SlowDown"}.get(int(fault[1]), "InternalError")
                    message = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_header("Content-Length", str(len(message)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD response carries no body, or the connection desyncs
                        self.wfile.write(message)
                    return
                if fault and fault[0] == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                if fault and fault[0] == "delay":
                    time.sleep(fault[1])
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                headers["Host"] = f"127.0.0.1:{proxy.upstream_port}"
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                except OSError:  # upstream gone (e.g. a delayed request outliving its test): a gateway error
                    self.send_error(502)
                    return
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if fault and fault[0] == "truncate" and self.command == "GET":
                    self.wfile.write(payload[: int(len(payload) * fault[1])])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    try:
                        self.wfile.write(payload)
                    except OSError:  # the client gave up (its timeout fired): nothing to deliver to
                        self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def inject(self, kind: str, count: int = 1, argument: float = 0.0) -> None:
        """kind: "status" (argument = HTTP status), "delay" (seconds), "truncate" (fraction kept), "reset"."""
        with self._lock:
            self.faults.extend([(kind, argument)] * count)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
