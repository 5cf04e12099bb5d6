"""Loopback servers for the `remote` tests: an HTTP server over a shard folder whose faults can be switched on per
file (dropped connection mid-file, HTTP 503, a stalled response) and that can be stopped mid-way, and moto's S3
server on 127.0.0.1 with the AWS_* environment pointing at it. Both bind port 0, so tests never collide.

Use them as context managers (`with ShardHTTPServer(folder) as server: ... server.url ...`), or through the pytest
fixtures at the bottom: `from remote_servers import s3_server, s3_bucket` in a test module.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

STALL_SECONDS = 10  # upper bound on a stalled response: the client's timeout must fire well before this


class _FaultyHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output readable
        pass

    def do_GET(self):
        name = self.path.lstrip("/").split("?")[0]
        fault = self.server.take_fault(name)
        if fault == "503":
            return self.send_error(503, "injected failure")
        span = self._range()
        if fault is None and span is None:
            return super().do_GET()
        path = self.translate_path(self.path)
        with open(path, "rb") as f:
            data = f.read()
        if span is not None:
            start, end = span
            data = data[start:end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(data) - 1}/*")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))  # with a fault: promise everything, deliver half
        self.end_headers()
        sent = data if fault is None else data[: len(data) // 2]
        if span is not None:  # counted before writing: the client may finish, and the test look, before write returns
            self.server.record_bytes(name, len(sent))
        self.wfile.write(sent)
        if fault is None:
            return
        self.wfile.flush()
        if fault == "stall" and not self.server.stopping.wait(STALL_SECONDS):
            with self.server.lock:
                self.server.stalls_expired += 1  # the client waited longer than the server stalled
        self.close_connection = True  # "drop": the socket closes with the rest of the body missing

    def _range(self) -> tuple[int, int] | None:
        """(first, last) byte of a `Range: bytes=a-b` request, when this server honours Range at all."""
        header = self.headers.get("Range")
        if not self.server.ranges or not header or not header.startswith("bytes="):
            return None
        first, _, last = header[len("bytes="):].partition("-")
        return int(first), int(last)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root, ranges):
        super().__init__(("127.0.0.1", 0), functools.partial(_FaultyHandler, directory=str(root)))
        self.ranges = ranges
        self.range_bytes: dict[str, int] = {}
        self.faults: dict[str, list] = {}  # file name -> [kind, times left or None for always]
        self.stopping = threading.Event()
        self.requests: list[str] = []
        self.stalls_expired = 0
        self.lock = threading.Lock()

    def record_bytes(self, name, count):
        with self.lock:
            self.range_bytes[name] = self.range_bytes.get(name, 0) + count

    def take_fault(self, name):
        with self.lock:
            self.requests.append(name)
            fault = self.faults.get(name)
            if fault is None:
                return None
            kind, left = fault
            if left is not None:
                if left == 0:
                    return None
                fault[1] = left - 1
            return kind


class ShardHTTPServer:
    """Serves folder `root` at `self.url` (http://127.0.0.1:PORT) from a background thread. With `ranges` it answers
    `Range: bytes=a-b` requests with 206 and those bytes (python's http.server alone ignores Range, as some servers
    do: ranges=False keeps that behaviour)."""

    def __init__(self, root, ranges: bool = True):
        self._server = _Server(root, ranges)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        # a short poll interval makes stop() quick (shutdown waits for the next poll)
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def fail(self, name: str, kind: str = "drop", times: int | None = None) -> None:
        """Make GET `name` fail: kind "drop" (half the body, then close), "503", or "stall" (half, then silence);
        the next `times` requests, or all of them when None."""
        assert kind in ("drop", "503", "stall"), kind
        with self._server.lock:
            self._server.faults[name] = [kind, times]

    def requests_for(self, name: str) -> int:
        with self._server.lock:
            return self._server.requests.count(name)

    def bytes_sent_by_range(self, name: str) -> int:
        """Bytes of `name` sent in answer to Range requests."""
        with self._server.lock:
            return self._server.range_bytes.get(name, 0)

    def stalls_expired(self) -> int:
        """Stalled responses that ran out of patience before the client gave up (0 if client timeouts work)."""
        with self._server.lock:
            return self._server.stalls_expired

    def stop(self) -> None:
        """Stop serving and close the listening socket: later connections are refused."""
        if self._server.stopping.is_set():
            return
        self._server.stopping.set()  # releases stalled handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STALL_SECONDS)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


_AWS_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
)


class MotoS3Server:
    """moto's S3 server in a thread on 127.0.0.1, with the AWS_* variables (this process's, inherited by
    subprocesses) pointing at it: fake credentials, region, and AWS_ENDPOINT_URL, which botocore honours itself.
    The previous values come back on stop()."""

    ACCESS_KEY = "moto-test-access-key"
    SECRET_KEY = "moto-test-secret-key-do-not-log"

    def __init__(self):
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            # a developer's ~/.aws must not redirect the tests
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        self._saved = {k: os.environ.get(k) for k in _AWS_VARS}
        for k in _AWS_VARS:
            os.environ.pop(k, None)
        os.environ.update(self.env)

    def make_bucket(self, prefix: str = "shards") -> str:
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3").create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        import boto3

        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))

    def stop(self) -> None:
        self._server.stop()
        for k, v in self._saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# --- pytest fixtures -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_server():
    # moto and flask are in the test extra: missing, the tests must fail, not skip
    with MotoS3Server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket name on the module's moto server."""
    return s3_server.make_bucket()
