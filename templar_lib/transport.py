"""Reading endpoints strangers run: HTTP(S) with limits a hostile server cannot get around (DESIGN §3).

Every miner commits its own bucket endpoint, so validators and the aggregator talk to servers run by people who gain
from holding them up, from reading private addresses through them, or from making them buffer without end. A peer's
S3 bucket is still read through botocore (it signs with the peer's published read keys and parses the answers), but
the request itself is sent here, from botocore's documented `before-send` event:

    address   the peer address of the connected socket is checked, after the DNS lookup and the connect (so an answer
              that changes between lookup and connect changes nothing): loopback, private, link-local, reserved,
              multicast and unspecified addresses are refused unless the deployment allows them (`allow_private`: a
              local network, tests)
    timeouts  connect and per-read socket timeouts (a HEAD that never answers)
    rate      after `grace` seconds a body must have arrived at `min_rate` bytes per second on average: a trickle is cut
    deadline  a transfer may not outlive the caller's deadline (`Guard.until`), headers and body alike
    abort     `Guard.abort()` shuts down every socket of the guard from another thread, so nothing is left reading once
              a gather has returned and the process can exit

A body is read one socket read at a time (urllib3's read1) and never buffered here; the caller caps its size.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
import time
import weakref
from dataclasses import dataclass

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, NewConnectionError, ProtocolError, ReadTimeoutError

CHUNK = 1 << 16


class TransferRefused(Exception):
    """A transfer the guard will not make or finish: a refused address, too slow, past its deadline, aborted. Not a
    botocore error, so botocore does not retry it."""


class DeadlinePassed(TransferRefused):
    """The caller's deadline came first."""


@dataclass(frozen=True)
class Limits:
    connect_timeout: float = 5.0  # seconds to connect
    read_timeout: float = 5.0  # seconds any one socket read may wait
    min_rate: float = 64 * 1024  # bytes per second a body must average once `grace` has passed
    grace: float = 2.0  # seconds before the rate is enforced
    allow_private: bool = False  # loopback, private and link-local addresses (a local network, tests)


def address_refusal(address: str) -> str | None:
    """Why a peer address may not be read in production, or None."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "private", "link_local", "reserved", "multicast", "unspecified"):
        if getattr(ip, f"is_{kind}"):
            return f"refused: the endpoint's address {ip} is {kind.replace('_', '-')}"
    return None


class Guard:
    """One bucket's guarded transport: a urllib3 pool whose connections check their peer address, the deadline of
    the calls made in this thread, and every socket in flight (for `abort`)."""

    def __init__(self, limits: Limits = Limits()) -> None:
        from botocore.httpsession import get_cert_path

        self.limits = limits
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._local = threading.local()
        guard = self

        class Connection(HTTPConnection):
            def _new_conn(self) -> socket.socket:
                return guard._checked(super()._new_conn())

        class SecureConnection(HTTPSConnection):
            def _new_conn(self) -> socket.socket:
                return guard._checked(super()._new_conn())

        class Pool(HTTPConnectionPool):
            ConnectionCls = Connection

        class SecurePool(HTTPSConnectionPool):
            ConnectionCls = SecureConnection

        self._manager = urllib3.PoolManager(num_pools=4, maxsize=4, cert_reqs="CERT_REQUIRED",
                                            ca_certs=get_cert_path(True))
        self._manager.pool_classes_by_scheme = {"http": Pool, "https": SecurePool}

    # ------------------------------------------------------------------ deadlines and abort
    @contextlib.contextmanager
    def until(self, deadline: float | None):
        """Calls made in this thread inside the block end by `deadline` (time.monotonic()), or fail."""
        previous, self._local.deadline = getattr(self._local, "deadline", None), deadline
        try:
            yield
        finally:
            self._local.deadline = previous

    def deadline(self) -> float | None:
        return getattr(self._local, "deadline", None)

    def abort(self) -> None:
        """Shut down every socket this guard has open: any read in flight returns at once."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _checked(self, sock: socket.socket) -> socket.socket:
        reason = None if self.limits.allow_private else address_refusal(sock.getpeername()[0])
        if reason is not None:
            sock.close()
            raise TransferRefused(reason)
        with self._lock:
            self._sockets.add(sock)
        return sock

    # ------------------------------------------------------------------ botocore
    def attach(self, client) -> None:
        """Send every request of a botocore client through this guard."""
        client.meta.events.register_first("before-send", self._send)

    def _send(self, request, **_) -> object:
        from botocore.awsrequest import AWSResponse
        from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError as Timeout

        deadline = self.deadline()
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlinePassed("past the deadline")
        timeout = urllib3.Timeout(connect=_shorter(self.limits.connect_timeout, remaining),
                                  read=_shorter(self.limits.read_timeout, remaining))
        try:
            response = self._manager.connection_from_url(request.url).urlopen(
                request.method, urllib3.util.parse_url(request.url).request_uri, body=request.body,
                headers=dict(request.headers.items()), retries=False,
                redirect=False, assert_same_host=False, preload_content=False, decode_content=False, timeout=timeout)
        except (ProtocolError, HTTPError, OSError) as error:
            if deadline is not None and time.monotonic() >= deadline:  # aborted at the deadline: no retry
                raise DeadlinePassed("past the deadline") from None
            if isinstance(error, NewConnectionError):
                raise EndpointConnectionError(endpoint_url=request.url, error=error) from None
            if isinstance(error, ReadTimeoutError):
                raise Timeout(endpoint_url=request.url, error=error) from None
            raise ConnectionClosedError(endpoint_url=request.url, error=error) from None
        return AWSResponse(request.url, response.status, response.headers, GuardedBody(response, self, deadline))


def _shorter(limit: float, remaining: float | None) -> float:
    return limit if remaining is None else max(0.01, min(limit, remaining))


class GuardedBody:
    """A response body read as it arrives, within the guard's rate and the call's deadline (what botocore's
    StreamingBody reads from)."""

    def __init__(self, response: urllib3.BaseHTTPResponse, guard: Guard, deadline: float | None) -> None:
        self._response, self._guard, self._deadline = response, guard, deadline
        self._started, self.received = time.monotonic(), 0

    def read(self, amt: int | None = None, *args, **kwargs) -> bytes:
        parts, wanted = [], amt
        while wanted is None or wanted > 0:
            self._check()
            try:
                chunk = self._response.read1(CHUNK if wanted is None else min(wanted, CHUNK))
            except (ProtocolError, HTTPError, OSError) as error:
                raise TransferRefused(f"the transfer broke off ({type(error).__name__})") from None
            if not chunk:
                break
            parts.append(chunk)
            self.received += len(chunk)
            if wanted is not None:
                wanted -= len(chunk)
        return b"".join(parts)

    def stream(self, amt: int = CHUNK, decode_content: bool | None = None):
        while chunk := self.read(amt):
            yield chunk

    def _check(self) -> None:
        now = time.monotonic()
        if self._deadline is not None and now > self._deadline:
            raise DeadlinePassed("past the deadline")
        elapsed = now - self._started
        limits = self._guard.limits
        if elapsed > limits.grace and self.received < limits.min_rate * (elapsed - limits.grace):
            raise TransferRefused(f"too slow: {self.received} bytes in {elapsed:.1f}s, below "
                                  f"{limits.min_rate:.0f} bytes/s")

    def close(self) -> None:
        self._response.close()

    def release_conn(self) -> None:
        self._response.release_conn()

    @property
    def closed(self) -> bool:
        return self._response.closed
