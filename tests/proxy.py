"""A loopback TCP proxy in front of a real broker, which a test can freeze or stop.

Frozen, it keeps accepting connections (as the kernel does for a stopped
process) but moves no byte in either direction: the broker looks alive and
never answers, like a broker under ``SIGSTOP``, without stopping the shared
broker other tests use.  Stopped, it closes every connection and refuses new
ones, like a broker that went down.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading


class FreezableProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``freeze()``, ``thaw()``, ``stop()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._running = threading.Event()  # set: bytes flow; clear: frozen
        self._running.set()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, scheme: str = "amqp", credentials: str = "guest:guest@", path: str = "//") -> str:
        return f"{scheme}://{credentials}127.0.0.1:{self.port}{path}"

    def freeze(self) -> None:
        self._running.clear()

    def thaw(self) -> None:
        self._running.set()

    def stop(self) -> None:
        """Close every connection and the listening socket: connections are refused."""
        self._stopped.set()
        self._running.set()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in [self._listener, *sockets]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, upstream]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._stopped.is_set():
                if not self._running.wait(timeout=0.05):
                    continue  # frozen: read nothing, so nothing is answered
                readable, _, _ = select.select(list(peers), [], [], 0.05)
                for sock in readable:
                    if not self._running.is_set():
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in peers:
                with contextlib.suppress(OSError):
                    sock.close()
