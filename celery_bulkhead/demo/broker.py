"""Finding a broker for the demo, or starting a private one.

In this order:

1. ``--broker URL``, else the ``CELERY_BROKER_URL`` environment variable: a
   Redis the user already runs (``redis://`` or ``rediss://``).  The demo
   shares it politely: every key it writes starts with the run's prefix or
   names the run's own breaker and tenants, and is deleted at the end.
2. ``redis-server`` on ``PATH``: started privately on a free loopback port,
   with no persistence, its working directory in the demo's temporary
   directory.  Stopped at the end.
3. The embedded server: fakeredis's ``TcpFakeServer`` (a Redis written in
   Python, with Lua through lupa), which ``pip install
   'celery-bulkhead[demo]'`` brings.  It runs in a child process of its own
   (run as ``python -m celery_bulkhead.demo.broker PORT_FILE``) so that its
   work does not share the demo's interpreter, bound to 127.0.0.1 on a port
   the kernel picks.  docs/demo.md says why this one.

Nothing here needs root, Docker or a service manager.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .processes import Child, Processes

__all__ = ["Broker", "DemoError", "choose_broker", "package_path"]

EXTRA = "pip install 'celery-bulkhead[demo]'"
_START_TIMEOUT = 20.0


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says what to do."""


@dataclass
class Broker:
    """The Redis the demo runs on."""

    url: str
    #: ``"url"`` (given), ``"redis-server"`` (started here) or ``"embedded"`` (fakeredis).
    kind: str
    description: str
    #: The server process, when the demo started it.
    child: Child | None = None

    @property
    def private(self) -> bool:
        """Started for this demo alone: nothing on it needs deleting, it is stopped."""
        return self.child is not None


def _ping(url: str, timeout: float) -> str | None:
    """None when the Redis at ``url`` answers PING, else why not."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def _wait_for(url: str, child: Child, what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        problem = _ping(url, 1.0)
        if problem is None:
            return
        if not child.running():
            raise DemoError(
                f"{what} exited at start (code {child.process.returncode}):\n{child.log_tail()}"
            )
        if time.monotonic() > deadline:
            raise DemoError(f"{what} did not answer within {_START_TIMEOUT:g} s ({problem})")
        time.sleep(0.05)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _given(url: str, source: str) -> Broker:
    if not url.lower().startswith(("redis://", "rediss://")):
        raise DemoError(
            f"the demo needs a Redis broker (its records and the bulkheads' shared state live "
            f"there); {source} is {url.split('://', 1)[0]}://...: pass --broker redis://HOST:PORT/DB"
        )
    problem = _ping(url, 3.0)
    if problem is not None:
        raise DemoError(f"cannot reach the broker from {source} ({problem})")
    from kombu.utils.url import maybe_sanitize_url

    return Broker(url, "url", f"{maybe_sanitize_url(url)} (from {source})")


def _redis_server(binary: str, processes: Processes, temp: Path) -> Broker:
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout.split()
    label = next((v.split("=", 1)[1] for v in version if v.startswith("v=")), "")
    for attempt in range(5):
        port = _free_port()  # racy: a port taken meanwhile makes the server exit; try another
        data = temp / f"redis-{attempt}"
        data.mkdir()
        child = processes.spawn(
            "redis-server",
            [
                binary,
                *("--bind", "127.0.0.1", "--port", str(port)),
                *("--save", "", "--appendonly", "no", "--dir", str(data)),
                *("--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"),
            ],
            log_path=temp / f"redis-{attempt}.log",
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_for(url, child, "redis-server")
        except DemoError:
            processes.stop(child, 2.0)
            if attempt == 4:
                raise
            continue
        description = f"a private redis-server {label} on 127.0.0.1:{port} (no persistence)"
        return Broker(url, "redis-server", description.replace("  ", " "), child)
    raise AssertionError("unreachable")


def _embedded(processes: Processes, temp: Path) -> Broker:
    missing = [name for name in ("fakeredis", "lupa") if importlib.util.find_spec(name) is None]
    if missing:
        raise DemoError(
            "no broker: no --broker or CELERY_BROKER_URL, no redis-server on PATH, and the "
            f"embedded one needs {' and '.join(missing)}: {EXTRA}"
        )
    port_file = temp / "embedded.port"
    child = processes.spawn(
        "embedded-redis",
        [sys.executable, "-m", "celery_bulkhead.demo.broker", str(port_file)],
        log_path=temp / "embedded.log",
        env={**os.environ, "PYTHONPATH": package_path()},
    )
    deadline = time.monotonic() + _START_TIMEOUT
    while not port_file.exists():
        if not child.running():
            raise DemoError(f"the embedded Redis exited at start:\n{child.log_tail()}")
        if time.monotonic() > deadline:
            raise DemoError(f"the embedded Redis did not start within {_START_TIMEOUT:g} s")
        time.sleep(0.05)
    port = int(port_file.read_text())
    url = f"redis://127.0.0.1:{port}/0"
    _wait_for(url, child, "the embedded Redis")
    return Broker(
        url,
        "embedded",
        f"the embedded Redis-compatible server (fakeredis with Lua) on 127.0.0.1:{port}",
        child,
    )


def package_path() -> str:
    """PYTHONPATH for children: this package's parent first (a checkout works uninstalled)."""
    root = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(p for p in (root, rest) if p)


def choose_broker(option: str | None, processes: Processes, temp: Path) -> Broker:
    """The broker to run on: ``--broker``, ``$CELERY_BROKER_URL``, redis-server, embedded."""
    if importlib.util.find_spec("redis") is None:
        raise DemoError(f"the demo needs redis-py: {EXTRA}")
    if option:
        return _given(option, "--broker")
    env = os.environ.get("CELERY_BROKER_URL")
    if env:
        return _given(env, "CELERY_BROKER_URL")
    binary = shutil.which("redis-server")
    if binary:
        return _redis_server(binary, processes, temp)
    return _embedded(processes, temp)


def _serve_embedded(port_file: str) -> None:
    """Run fakeredis's TCP server on a loopback port the kernel picks; write the port."""
    from fakeredis import TcpFakeServer

    server = TcpFakeServer(("127.0.0.1", 0))
    # Its handler writes each reply of a pipeline on its own; with Nagle's algorithm on,
    # the second write waits for the client's delayed ACK: 40 ms per pipelined call
    # (kombu acknowledges every message with one).  TCP_NODELAY, as Redis itself sets.
    handler = server.RequestHandlerClass
    assert isinstance(handler, type)
    server.RequestHandlerClass = type(
        "NoDelayHandler", (handler,), {"disable_nagle_algorithm": True}
    )
    port = server.server_address[1]
    partial = Path(port_file + ".tmp")
    partial.write_text(str(port))
    partial.replace(port_file)  # whole or nothing: the demo polls for this file
    server.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    _serve_embedded(sys.argv[1])
