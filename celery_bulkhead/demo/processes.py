"""Every process the demo starts, and how each one is stopped, however the demo ends.

* Each child starts in a session (and process group) of its own, so a
  terminal's Ctrl-C reaches the demo alone and the demo decides how its
  children stop; on Linux a child is also told to die with the demo
  (``PR_SET_PDEATHSIG``) should the demo itself be killed.
* The demo keeps a list of every process it started and every descendant it
  has seen (``celery bulkhead worker`` runs each pool's worker in a session
  of its own), each with its start time, so a pid the system has reused is
  never signalled.
* :meth:`Processes.stop` asks politely (SIGTERM, Celery's warm shutdown),
  waits, then sends SIGKILL to the process group of every process it
  remembers that is still running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Child", "Processes"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process: /proc on Linux, else ``ps``."""
    found: dict[int, tuple[int, str]] = {}
    proc = Path("/proc")
    if (proc / "self" / "stat").exists():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] == "Z":  # a zombie has ended; only its parent's wait is missing
                continue
            found[int(entry.name)] = (int(fields[1]), fields[19])
        return found
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=,ppid=,stat=,lstart="],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return found
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) == 4 and parts[0].isdigit() and not parts[2].startswith("Z"):
            found[int(parts[0])] = (int(parts[1]), parts[3].strip())
    return found


@dataclass
class Child:
    """A process the demo started, and the descendants seen under it."""

    label: str
    process: subprocess.Popen[bytes]
    log_path: Path | None
    #: Stopped before the children of lower layers (workers: 1, the broker: 0).
    layer: int = 0
    #: pid -> start time of this process and every descendant seen so far.
    known: dict[int, str] = field(default_factory=dict)
    #: pid -> its process group, as seen when it was first noted.
    groups: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """The processes of one demo: started, remembered, stopped."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        #: Set by a second Ctrl-C: stop everything now, without waiting.
        self.hurry = False

    def spawn(
        self,
        label: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        layer: int = 0,
    ) -> Child:
        """Start ``argv`` in a session of its own, output to ``log_path`` (or nowhere)."""
        linux = sys.platform.startswith("linux")
        with contextlib.ExitStack() as stack:
            out = (
                stack.enter_context(log_path.open("ab"))
                if log_path is not None
                else subprocess.DEVNULL
            )
            process = subprocess.Popen(
                list(argv),
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent if linux else None,
            )
        child = Child(label, process, log_path, layer)
        self.children.append(child)
        self.remember(child)
        return child

    def remember(self, child: Child, table: dict[int, tuple[int, str]] | None = None) -> None:
        """Note the child's descendants as they are now (each with its start time)."""
        table = _table() if table is None else table
        todo = [child.pid]
        while todo:
            pid = todo.pop()
            if pid in table:
                if pid not in child.known:
                    child.known[pid] = table[pid][1]
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        child.groups[pid] = os.getpgid(pid)
                todo += [p for p, (ppid, _) in table.items() if ppid == pid]

    def remember_all(self) -> None:
        table = _table()
        for child in self.children:
            if child.running():
                self.remember(child, table)

    def living(self, child: Child) -> list[int]:
        """The remembered processes of ``child`` that are still running (same start time)."""
        table = _table()
        return [pid for pid, start in child.known.items() if table.get(pid, (0, ""))[1] == start]

    def stop(self, child: Child, timeout: float) -> float:
        """SIGTERM, up to ``timeout`` s to exit, then SIGKILL; seconds taken."""
        return self.stop_many([child], timeout)

    def stop_many(self, children: Sequence[Child], timeout: float) -> float:
        """SIGTERM to each (Celery's warm shutdown), up to ``timeout`` s, then SIGKILL."""
        started = time.monotonic()
        table = _table()
        for child in children:
            if child.running():
                self.remember(child, table)
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = started + timeout
        while any(c.running() for c in children) and not self.hurry:
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        # What is left (the top process, or a pool worker whose supervisor is gone)
        # gets a moment to exit on its own, then SIGKILL of its process group.
        grace = time.monotonic() + 2.0
        while any(self.living(c) for c in children) and not self.hurry:
            if time.monotonic() >= grace:
                break
            time.sleep(0.05)
        for child in children:
            self.kill(child)
        return time.monotonic() - started

    def kill(self, child: Child) -> None:
        """SIGKILL every remembered process of ``child`` still running, and its group."""
        for pid in self.living(child):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                pgid = os.getpgid(pid)
                if pgid in child.known:  # only a group one of our own processes leads
                    os.killpg(pgid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.process.wait(timeout=5)

    def stop_all(self, timeout: float) -> None:
        """Stop every child, the upper layers first (workers before the broker they use)."""
        for layer in sorted({c.layer for c in self.children}, reverse=True):
            self.stop_many([c for c in self.children if c.layer == layer], timeout)

    def started(self) -> list[dict[str, object]]:
        """Every process started or seen: pid, start time, process group, what it was."""
        return [
            {"pid": pid, "start": start, "pgid": child.groups.get(pid), "label": child.label}
            for child in self.children
            for pid, start in child.known.items()
        ]
