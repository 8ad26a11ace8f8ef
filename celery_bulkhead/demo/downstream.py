"""The webhooks' third party: a local HTTP endpoint that hangs, then fails, then recovers.

It listens on 127.0.0.1 on a port the kernel picks, in a thread of the demo's
process.  Its health follows the run's :class:`~celery_bulkhead.demo.story.Timeline`:

* healthy: answers 200 after 20 ms;
* hanging: accepts the request and does not answer until the hang is over
  (the caller's own timeout is what ends the call: a hung API holds a worker
  slot for as long as the caller is willing to wait);
* failing: answers 503 at once.

It counts the calls it receives in each state, so the report can say how many
calls reached it while it was down.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .story import Timeline

__all__ = ["Downstream"]

_HEALTHY_SECONDS = 0.02
_LONGEST_HANG = 120.0


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        downstream = self.server.downstream
        phase = downstream.phase()
        downstream.count(phase)
        if phase == "hanging":
            downstream.wait_out_hang()
            status = 504
        elif phase == "failing":
            status = 503
        else:
            time.sleep(_HEALTHY_SECONDS)
            status = 200
        with contextlib.suppress(OSError):  # the caller may have given up long ago
            body = b"ok\n" if status == 200 else b"unavailable\n"
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: the demo's output is its progress, not an access log."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    downstream: Downstream


class Downstream:
    """The endpoint the webhooks call; healthy until :meth:`follow` gives it a timeline."""

    def __init__(self) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.downstream = self
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._start: float | None = None
        self._timeline: Timeline | None = None
        self.calls: Counter[str] = Counter()
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="demo-downstream",
            daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/hook"

    def follow(self, start: float | None, timeline: Timeline | None) -> None:
        """From ``start`` (``time.time()``) on, be as ``timeline`` says; None: always healthy."""
        with self._lock:
            self._start, self._timeline = start, timeline
            if timeline is not None:
                self.calls = Counter()

    def phase(self) -> str:
        with self._lock:
            start, timeline = self._start, self._timeline
        if start is None or timeline is None:
            return "healthy"
        return timeline.phase(time.time() - start)

    def count(self, phase: str) -> None:
        with self._lock:
            self.calls[phase] += 1

    def wait_out_hang(self) -> None:
        deadline = time.monotonic() + _LONGEST_HANG
        while self.phase() == "hanging" and time.monotonic() < deadline:
            if self._closing.wait(0.05):
                return

    def close(self) -> None:
        """Release every hung request and stop listening."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
