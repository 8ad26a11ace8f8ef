"""A loopback TCP proxy in front of a real broker, which a test can freeze, cut or stop.

Frozen, it keeps accepting connections (as the kernel does for a stopped
process) but moves no byte in either direction: the broker looks alive and
never answers, like a broker under ``SIGSTOP``, without stopping the shared
broker other tests use.  Cut, it closes the connections it carries and keeps
accepting new ones, like a broker restart or a network drop.  Stopped, it
closes every connection and refuses new ones, like a broker that went down.

A fault can also wait for a given AMQP method (:meth:`FreezableProxy.freeze_at`,
:meth:`FreezableProxy.cut_at`), to hit one exact step of a publish: the
channel open right after a reconnect's handshake, the confirm after a publish.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
from dataclasses import dataclass

#: AMQP 0-9-1 methods (class id, method id) a fault can wait for.
CHANNEL_OPEN = (20, 10)
QUEUE_DECLARE = (50, 10)
BASIC_PUBLISH = (60, 40)
BASIC_ACK = (60, 80)
BASIC_NACK = (60, 120)

_FRAME_END = 0xCE


@dataclass
class _Trigger:
    """A fault armed for the ``skip + 1``-th frame of ``method`` sent by ``sender``."""

    action: str  # "freeze" or "cut"
    sender: str  # "client" or "broker"
    method: tuple[int, int]
    skip: int
    deliver: bool  # a client's frame: deliver it, then freeze (else: hold it back)
    fired: threading.Event


class _Frames:
    """Splits one direction of an AMQP connection into method ids, across reads."""

    def __init__(self) -> None:
        self._buffer = b""
        self._started = False

    def methods(self, data: bytes) -> list[tuple[int, int]]:
        self._buffer += data
        if not self._started:
            if self._buffer.startswith(b"AMQP"):
                if len(self._buffer) < 8:
                    return []
                self._buffer = self._buffer[8:]  # the client's protocol header
            self._started = True
        found = []
        while len(self._buffer) >= 7:
            kind, _channel, size = struct.unpack(">BHI", self._buffer[:7])
            if len(self._buffer) < size + 8:
                break
            payload = self._buffer[7 : 7 + size]
            if self._buffer[7 + size] != _FRAME_END:
                self._buffer = b""  # not AMQP after all: stop looking
                break
            if kind == 1 and size >= 4:
                found.append(struct.unpack(">HH", payload[:4]))
            self._buffer = self._buffer[size + 8 :]
        return found


class FreezableProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``freeze()``, ``thaw()``, ``cut()``, ``stop()``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._running = threading.Event()  # set: bytes flow; clear: frozen
        self._running.set()
        self._stopped = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._triggers: list[_Trigger] = []
        #: Every AMQP method that went through: ("client" or "broker", (class id, method id)).
        self.seen: list[tuple[str, tuple[int, int]]] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, scheme: str = "amqp", credentials: str = "guest:guest@", path: str = "//") -> str:
        return f"{scheme}://{credentials}127.0.0.1:{self.port}{path}"

    def freeze(self) -> None:
        self._running.clear()

    def thaw(self) -> None:
        with self._lock:
            self._triggers.clear()
        self._running.set()

    def freeze_at(
        self,
        method: tuple[int, int],
        *,
        sender: str = "client",
        skip: int = 0,
        deliver: bool = False,
    ) -> threading.Event:
        """Freeze when ``sender`` next sends ``method`` (after ``skip`` of them).

        A client's frame is held back (the broker never sees it) unless
        ``deliver``; a broker's frame is always delivered, then everything
        stops.  Returns an event set when the freeze happened.
        """
        return self._arm("freeze", sender, method, skip, deliver or sender == "broker")

    def cut_at(
        self, method: tuple[int, int], *, sender: str = "client", skip: int = 0
    ) -> threading.Event:
        """Close the connection on which ``sender`` next sends ``method``, dropping that frame."""
        return self._arm("cut", sender, method, skip, False)

    def cut(self) -> None:
        """Close every connection carried now; new ones are accepted and forwarded."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

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

    def _arm(
        self, action: str, sender: str, method: tuple[int, int], skip: int, deliver: bool
    ) -> threading.Event:
        assert sender in ("client", "broker")
        trigger = _Trigger(action, sender, method, skip, deliver, threading.Event())
        with self._lock:
            self._triggers.append(trigger)
        return trigger.fired

    def _fire(self, sender: str, methods: list[tuple[int, int]]) -> _Trigger | None:
        """The armed trigger these frames set off, if any (removed once fired)."""
        if not methods:
            return None
        with self._lock:
            self.seen += [(sender, method) for method in methods]
            for trigger in list(self._triggers):
                if trigger.sender != sender:
                    continue
                for method in methods:
                    if method != trigger.method:
                        continue
                    if trigger.skip > 0:
                        trigger.skip -= 1
                        continue
                    self._triggers.remove(trigger)
                    return trigger
        return None

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
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        senders = {client: "client", upstream: "broker"}
        frames = {client: _Frames(), upstream: _Frames()}
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
                    trigger = self._fire(senders[sock], frames[sock].methods(data))
                    if trigger is not None and trigger.action == "cut":
                        trigger.fired.set()
                        return  # the frame is dropped and both sides closed
                    if trigger is not None and not trigger.deliver:
                        self._running.clear()  # hold the frame back until thawed
                        trigger.fired.set()
                        while not self._running.wait(timeout=0.05):
                            if self._stopped.is_set():
                                return
                    peers[sock].sendall(data)
                    if trigger is not None and trigger.deliver:
                        self._running.clear()  # delivered, then nothing more
                        trigger.fired.set()
        except OSError:
            return
        finally:
            for sock in peers:
                with contextlib.suppress(OSError):
                    sock.close()
