"""A stand-in for a tenant's webhook receiver, to watch the webhooks pool misbehave.

    python receiver.py                    # answers 200 at once
    python receiver.py --delay 60         # a slow receiver: fills the webhooks threads
    python receiver.py --status 503       # a broken receiver: opens the breaker
    python receiver.py --status 410       # refuses: a 4xx, excluded from the breaker

It listens on 127.0.0.1:8080 (``--port``), where ``SHOP_WEBHOOK_URL`` points by
default, and prints one line per webhook.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--status", type=int, default=200, help="HTTP status to answer")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    options = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(options.delay)
            self.send_response(options.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            print(f"{options.status} {self.path} {body.decode(errors='replace')}", flush=True)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per webhook is printed above

    server = ThreadingHTTPServer(("127.0.0.1", options.port), Handler)
    print(f"receiving webhooks on http://127.0.0.1:{options.port}/ (Ctrl-C to stop)", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how it stops
        server.serve_forever()


if __name__ == "__main__":
    main()
