"""Hostile HTTP endpoints on loopback: what a stranger's bucket endpoint can do to a validator, for the simulator's
`slow_endpoint` miners and the tests.

    silent    accepts the connection and never answers (a HEAD or GET that hangs)
    trickle   answers the headers of a large object, then sends its body at one byte a second
    endless   answers a chunked body and sends data as fast as it can, forever
    bare      answers 200 with no size, no time and no body, and closes (what no S3 server sends)
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time


class HostileServer:
    def __init__(self, mode: str) -> None:
        self.mode, self._stop = mode, threading.Event()
        hostile = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(1.0)
                try:
                    hostile._serve(self.request)
                except OSError:
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request and not self._stop.is_set():
            try:
                request += connection.recv(4096)
            except TimeoutError:
                continue
        if self.mode == "silent":
            while not self._stop.wait(0.5):
                pass
        elif self.mode == "trickle":
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 500000\r\nContent-Type: binary/octet-stream"
                               b"\r\nLast-Modified: Tue, 01 Dec 2026 00:00:00 GMT\r\n\r\n")
            while not self._stop.wait(1.0):
                connection.sendall(b"x")
        elif self.mode == "bare":
            connection.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        elif self.mode == "endless":
            connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: binary/octet-stream"
                               b"\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
            while not self._stop.is_set():
                connection.sendall(chunk)

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        time.sleep(0.1)
