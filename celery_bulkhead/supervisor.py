"""Supervises one ``celery worker`` process per pool.

What it guarantees:

* every pool's worker runs in its own process (its own session, so a
  terminal's Ctrl-C reaches it once, through the supervisor);
* a worker that exits on its own is restarted, with an exponential back-off
  (1 s doubling to 30 s, reset after a minute of healthy running);
* SIGTERM or SIGINT starts a *drain*: each worker gets SIGTERM (Celery's warm
  shutdown: stop consuming, finish running tasks) and has its pool's
  ``drain_timeout`` to exit.  Then it is stopped hard: a prefork worker gets
  SIGQUIT (Celery's cold shutdown, which hands unacknowledged ``acks_late``
  messages back to the broker) and, 10 s later, SIGKILL; a threads, solo,
  gevent or eventlet worker cannot cancel a running task (Celery's cold
  shutdown crashes on them and may acknowledge the message as failed), so its
  process group gets SIGKILL at once and the broker redelivers the
  unacknowledged messages (RabbitMQ when the connection drops, Redis after
  ``visibility_timeout``).  A second SIGTERM/SIGINT, or SIGQUIT, skips to the
  hard stop.  With ``acks_late`` (the default) nothing is lost;
* SIGHUP, SIGUSR1 and SIGUSR2 are forwarded to every worker;
* if the supervisor itself is killed, Linux sends its workers SIGTERM.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Supervisor", "WorkerSpec"]

logger = logging.getLogger(__name__)

HARD_KILL_GRACE = 10.0
BACKOFF_MIN, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0
_FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSpec:
    """One supervised worker: a name (the pool), its argv and how it stops.

    ``cold_signal`` is sent when the drain time is up (SIGQUIT for prefork);
    ``None`` means the worker cannot stop a running task itself, so its
    process group is killed instead.
    """

    name: str
    argv: list[str]
    drain_timeout: float
    cold_signal: int | None = signal.SIGQUIT


@dataclass
class _Child:
    spec: WorkerSpec
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    cold_at: float | None = None
    kill_at: float | None = None
    stopped_hard: bool = False
    exit_codes: list[int] = field(default_factory=list)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Runs and supervises the given workers until they are all stopped."""

    def __init__(
        self,
        specs: Sequence[WorkerSpec],
        *,
        spawn: Callable[[WorkerSpec], subprocess.Popen[bytes]] | None = None,
    ) -> None:
        self.children = [_Child(spec) for spec in specs]
        self._spawn = spawn or self._default_spawn
        self._pending: list[int] = []
        self._stopping = False
        self._cold = False

    @staticmethod
    def _default_spawn(spec: WorkerSpec) -> subprocess.Popen[bytes]:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        return subprocess.Popen(spec.argv, start_new_session=True, preexec_fn=preexec)

    # -- signal plumbing ------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        self._pending.append(signum)

    def _install_signals(self) -> tuple[int, int]:
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, *_FORWARDED):
            signal.signal(signum, self._on_signal)
        return read_fd, write_fd

    # -- lifecycle ------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        child.process = self._spawn(child.spec)
        child.started_at = time.monotonic()
        child.restart_at = None
        logger.info("started worker for pool %r (pid %d)", child.spec.name, child.process.pid)

    def _send(self, child: _Child, signum: int) -> None:
        if child.process is not None and child.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.process.pid, signum)

    def _begin_drain(self, now: float) -> None:
        self._stopping = True
        for child in self.children:
            child.restart_at = None
            if child.process is not None and child.process.poll() is None and child.cold_at is None:
                logger.info(
                    "draining pool %r (up to %.1f s)", child.spec.name, child.spec.drain_timeout
                )
                self._send(child, signal.SIGTERM)
                child.cold_at = now + child.spec.drain_timeout

    def _go_cold(self, child: _Child, now: float) -> None:
        if child.process is None or child.process.poll() is not None or child.kill_at is not None:
            return
        child.stopped_hard = True
        child.cold_at = now
        cold = child.spec.cold_signal
        if cold is None:
            logger.warning("pool %r did not drain in time: killing it", child.spec.name)
            self._kill(child)
            child.kill_at = now + HARD_KILL_GRACE
            return
        logger.warning("pool %r did not drain in time: cold shutdown", child.spec.name)
        self._send(child, cold)
        child.kill_at = now + HARD_KILL_GRACE

    @staticmethod
    def _kill(child: _Child) -> None:
        if child.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)

    def _handle_signals(self, now: float) -> None:
        pending, self._pending = self._pending, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                if self._stopping:
                    self._cold = True
                self._begin_drain(now)
            elif signum == signal.SIGQUIT:
                self._begin_drain(now)
                self._cold = True
            elif signum in _FORWARDED:
                for child in self.children:
                    self._send(child, signum)
        if self._cold:
            for child in self.children:
                self._go_cold(child, now)

    def _reap(self, now: float) -> None:
        for child in self.children:
            process = child.process
            if process is None or process.poll() is None:
                continue
            code = process.returncode
            child.exit_codes.append(code)
            child.process = None
            if self._stopping:
                logger.info("worker for pool %r stopped (exit code %s)", child.spec.name, code)
                continue
            if now - child.started_at >= HEALTHY_AFTER:
                child.failures = 0
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2**child.failures)
            child.failures += 1
            child.restart_at = now + delay
            logger.error(
                "worker for pool %r exited unexpectedly (exit code %s); restarting in %.0f s",
                child.spec.name,
                code,
                delay,
            )

    def _timers(self, now: float) -> float:
        """Fire due timers; return seconds until the next one (at most 1 s)."""
        wait = 1.0
        for child in self.children:
            if child.restart_at is not None and not self._stopping:
                if now >= child.restart_at:
                    self._start(child)
                else:
                    wait = min(wait, child.restart_at - now)
            if child.process is None:
                continue
            if child.kill_at is not None:
                if now >= child.kill_at:
                    logger.error("pool %r is still running: SIGKILL", child.spec.name)
                    self._kill(child)
                    child.kill_at = now + HARD_KILL_GRACE
                else:
                    wait = min(wait, child.kill_at - now)
            elif child.cold_at is not None:
                if now >= child.cold_at:
                    self._go_cold(child, now)
                else:
                    wait = min(wait, child.cold_at - now)
        return max(wait, 0.0)

    def run(self) -> int:
        """Start every worker and supervise until all have stopped.

        Returns 0 when every worker drained in time, 1 when one had to be
        stopped hard.
        """
        read_fd, write_fd = self._install_signals()
        try:
            for child in self.children:
                self._start(child)
            while True:
                now = time.monotonic()
                self._handle_signals(now)
                self._reap(now)
                if self._stopping and all(c.process is None for c in self.children):
                    break
                wait = self._timers(time.monotonic())
                try:
                    select.select([read_fd], [], [], wait)
                    while os.read(read_fd, 512):
                        pass
                except (BlockingIOError, InterruptedError):
                    pass
        finally:
            signal.set_wakeup_fd(-1)
            os.close(read_fd)
            os.close(write_fd)
        return 1 if any(c.stopped_hard for c in self.children) else 0
