"""A local S3 for tests and benchmarks: a moto server, and an HTTP proxy that makes it fail.

`MotoS3` runs moto's S3 on 127.0.0.1 (a free port) with one bucket. `FaultProxy` sits in front of
any HTTP endpoint on 127.0.0.1 and fails a fraction of requests with 500/503 (S3-style XML errors,
so botocore retries them as it would retry AWS), delays requests, or goes down after N requests.
Point a client at it through `S3_ENDPOINT_URL` (Streaming and Composer read it) or `endpoint_url`:

    with MotoS3() as s3, FaultProxy(s3.url, fail_fraction=0.3, seed=1) as proxy:
        os.environ.update(s3.env(proxy.url))
        ...                           # convert / train against s3://<s3.bucket>/...
        proxy.down_after = proxy.requests      # the store goes down from here on

Which requests fail is drawn from `random.Random(seed)`, one draw per request in arrival order, so
a run that makes its requests in the same order fails the same ones. Every attribute given to the
constructor may be changed while the proxy runs. Needs moto (the `test` extra) for `MotoS3` only.
"""
from __future__ import annotations

import http.client
import logging
import random
import re
import sys
import threading
import time
import urllib.parse
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

LOCALHOST = "127.0.0.1"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}
# Headers that belong to one hop of a connection, not to the request (RFC 9110 §7.6.1).
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "content-length"}
_ERROR_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


class MotoS3:
    """moto's S3 server on 127.0.0.1 with bucket `bucket`, as a context manager.

    `.url` is its endpoint, `.client` a boto3 client on it, `env(url)` the environment a process
    needs to use it (`S3_ENDPOINT_URL` and fake credentials), optionally through a proxy's url.
    """

    def __init__(self, bucket: str = "m3test"):
        self.bucket = bucket
        self.url: str | None = None
        self.client: Any = None
        self._server = None

    def __enter__(self) -> "MotoS3":
        import boto3
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one INFO line per request otherwise
        self._server = ThreadedMotoServer(ip_address=LOCALHOST, port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        self.client = boto3.client("s3", endpoint_url=self.url, region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
                                   aws_access_key_id="testing", aws_secret_access_key="testing")
        self.client.create_bucket(Bucket=self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """Environment for clients of this server (through `endpoint`, e.g. a FaultProxy's url)."""
        return {"S3_ENDPOINT_URL": endpoint or self.url, **FAKE_CREDENTIALS}

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, sorted (read directly, never through a proxy)."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of `upstream_url` that injects faults.

    Args:
        upstream_url: `http://127.0.0.1:PORT` of the real server (e.g. `MotoS3.url`).
        fail_fraction: probability that a request is answered `fail_status` instead of forwarded.
        fail_status: the status of an injected failure (500 or 503 make botocore retry).
        delay_s: added latency of every request, failed or forwarded.
        down_after: when set, every request after the `down_after`-th (counting from the start,
            as `.requests` does) fails with 503: `proxy.down_after = proxy.requests` takes the
            store down now.
        seed: seed of the failure draws.
        fail_match: when set, a regular expression: only requests whose path matches it are
            subject to `fail_fraction` and `down_after` (e.g. `r"/shard\\."` fails shards only).
        max_in_flight: requests handled at once; more wait (bounds threads and memory).
        timeout_s: socket timeout towards the client (idle keep-alive connections close after it)
            and towards the upstream.

    `.url` is the proxy's endpoint, `.requests` and `.failed` count requests received and
    failures injected, `.history` holds the last 10,000 `(method, path, status)`.
    """

    def __init__(self, upstream_url: str, *, fail_fraction: float = 0.0, fail_status: int = 500,
                 delay_s: float = 0.0, down_after: int | None = None, seed: int = 0,
                 fail_match: str | None = None, max_in_flight: int = 32, timeout_s: float = 30.0):
        upstream = urllib.parse.urlsplit(upstream_url)
        if upstream.scheme != "http" or upstream.hostname not in (LOCALHOST, "localhost"):
            raise ValueError(f"FaultProxy: upstream must be http://127.0.0.1:PORT, got {upstream_url!r}")
        self._upstream = (upstream.hostname, upstream.port or 80)
        self.fail_fraction = fail_fraction
        self.fail_status = fail_status
        self.delay_s = delay_s
        self.down_after = down_after
        self.fail_match = fail_match
        self.timeout_s = timeout_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._in_flight = threading.BoundedSemaphore(max_in_flight)
        self._requests = 0
        self._failed = 0
        self.history: deque[tuple[str, str, int]] = deque(maxlen=10_000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    @property
    def requests(self) -> int:
        return self._requests

    @property
    def failed(self) -> int:
        return self._failed

    def __enter__(self) -> "FaultProxy":
        server = _QuietServer((LOCALHOST, 0), _handler_for(self))
        server.daemon_threads = True
        server.block_on_close = False     # idle keep-alive connections must not hold up close()
        self._server = server
        self.url = f"http://{LOCALHOST}:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="FaultProxy", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=self.timeout_s)
            self._server = None

    def _decide(self, path: str) -> int | None:
        """The injected status of the next request, or None to forward it."""
        with self._lock:
            self._requests += 1
            draw = self._rng.random()          # one draw per request, whether used or not
            if self.fail_match is not None and not re.search(self.fail_match, path):
                return None
            if self.down_after is not None and self._requests > self.down_after:
                status = 503
            elif draw < self.fail_fraction:
                status = self.fail_status
            else:
                return None
            self._failed += 1
            return status

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.history.append((method, path, status))


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # A client that exits (Composer's upload workers do) resets its idle keep-alive connections.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"     # keep-alive, as botocore's connection pool expects
        timeout = proxy.timeout_s

        def log_message(self, format, *args):   # noqa: A002 - quiet: tests read .history instead
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass                    # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            body = self._body()            # read it even when failing, so the connection stays usable
            with proxy._in_flight:
                status = proxy._decide(self.path)
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if status is None:
                    self._forward(body)
                else:
                    self._fail(status)

        def _fail(self, status: int) -> None:
            proxy._record(self.command, self.path, status)      # before the client can see the answer
            code = _ERROR_CODES.get(status, "InternalError")
            payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                       f"<Message>injected by FaultProxy</Message><Resource>{self.path}</Resource></Error>").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _forward(self, body: bytes) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection(*proxy._upstream, timeout=proxy.timeout_s)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                reply = response.getheaders()
            except OSError:
                self._fail(502)
                return
            finally:
                conn.close()
            proxy._record(self.command, self.path, response.status)
            self.send_response(response.status)
            for key, value in reply:
                if key.lower() not in _HOP_BY_HOP and key.lower() not in ("server", "date"):  # sent by send_response
                    self.send_header(key, value)
            length = response.getheader("Content-Length") if self.command == "HEAD" else str(len(payload))
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    return Handler
