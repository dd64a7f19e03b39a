"""A local stand-in for the Kaggle API, for tests that drive the real ``kaggle`` client.

:class:`FakeKaggle` is a threaded HTTP server on 127.0.0.1 (ephemeral port). It records every
request and answers:

- ``POST /api/v1/<service>/<Method>`` (kagglesdk's RPC paths, e.g.
  ``/api/v1/kernels.KernelsApiService/SaveKernel``) with the JSON given by :meth:`FakeKaggle.answer`
  for ``"<service>/<Method>"``; an RPC without an answer gets 404. ``StartBlobUpload`` and
  ``StartSubmissionUpload`` have default answers: a fresh token and an upload URL on this server.
- ``PUT /upload/<token>``: stores the bytes in :attr:`FakeKaggle.uploads` and answers
  :attr:`FakeKaggle.upload_status` (200 by default).
- ``GET /files/<name>``: serves :attr:`FakeKaggle.files` (kernel output downloads), with a
  ``Last-Modified`` of :attr:`FakeKaggle.files_modified` as cloud storage sends one.

Point the client at it with ``KaggleEnv.LOCAL`` (see tests/test_submit.py).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

RPC_PREFIX = "/api/v1/"


@dataclass
class Request:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def rpc(self) -> str | None:
        """``"<service>/<Method>"`` for an API call, else None."""
        return self.path[len(RPC_PREFIX):] if self.method == "POST" and self.path.startswith(RPC_PREFIX) else None

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


#: An answer: a JSON object (status 200), a (status, JSON object) pair, or a function of the request.
Answer = Union[dict, tuple, Callable[[Request], Union[dict, tuple]]]


class FakeKaggle:
    """The server; use as a context manager (or :meth:`start` / :meth:`stop`)."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.uploads: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.upload_status = 200
        self.files_modified = "Wed, 01 Jan 2020 00:00:00 GMT"
        self._answers: dict[str, list[Answer]] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.answer("blobs.BlobApiService/StartBlobUpload", self._start_upload)
        self.answer("competitions.CompetitionApiService/StartSubmissionUpload", self._start_upload)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKaggle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeKaggle:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def answer(self, rpc: str, *answers: Answer) -> None:
        """Answer calls of ``rpc`` with ``answers`` in turn; the last one repeats."""
        with self._lock:
            self._answers[rpc] = list(answers)

    def calls(self, rpc: str) -> list[Request]:
        """The recorded calls of one RPC, in order."""
        with self._lock:
            return [r for r in self.requests if r.rpc == rpc]

    def rpcs(self) -> list[str]:
        """The RPC names called, in order."""
        with self._lock:
            return [r.rpc for r in self.requests if r.rpc]

    # ------------------------------------------------------------------ internals
    def _start_upload(self, request: Request) -> dict:
        token = f"token-{next(self._tokens)}"
        return {"token": token, "createUrl": f"{self.url}/upload/{token}"}

    def _respond(self, request: Request) -> tuple[int, str, bytes]:
        """(status, content type, body) for a request; records it first."""
        with self._lock:
            self.requests.append(request)
        if request.rpc is not None:
            with self._lock:
                queue = self._answers.get(request.rpc)
                answer = None if not queue else (queue.pop(0) if len(queue) > 1 else queue[0])
            if answer is None:
                status, body = 404, {"code": 404, "message": f"fake Kaggle has no answer for {request.rpc}"}
            else:
                if callable(answer):
                    answer = answer(request)
                status, body = answer if isinstance(answer, tuple) else (200, answer)
            return status, "application/json", json.dumps(body).encode()
        if request.method == "PUT" and request.path.startswith("/upload/"):
            if self.upload_status in (200, 201):
                with self._lock:
                    self.uploads[request.path[len("/upload/"):]] = request.body
            return self.upload_status, "application/json", b"{}"
        if request.method == "GET" and request.path.startswith("/files/"):
            data = self.files.get(request.path[len("/files/"):])
            if data is not None:
                return 200, "application/octet-stream", data
        return 404, "text/plain", b"not found"


def _handler(fake: FakeKaggle) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(size)
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _handle(self) -> None:
            request = Request(self.command, self.path, dict(self.headers.items()), self._body())
            status, content_type, body = fake._respond(request)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if self.command == "GET" and status == 200:
                self.send_header("Last-Modified", fake.files_modified)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _handle

        def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
            pass

    return Handler
