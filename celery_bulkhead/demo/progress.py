"""Live progress of a run: a block redrawn in place on a terminal, plain lines otherwise."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["PoolCounts", "Progress", "Snapshot"]

_BAR = 28


@dataclass
class PoolCounts:
    """One pool's numbers so far."""

    sent: int = 0  # admitted: on their way to a worker
    refused: int = 0  # rejected, dropped or throttled at submit
    done: int = 0
    failed: int = 0

    @property
    def waiting(self) -> int:
        return max(self.sent - self.done, 0)


@dataclass
class Snapshot:
    """What the run looks like now."""

    elapsed: float  # seconds since the load started (negative while warming up)
    duration: float
    phase: str  # the downstream's state
    pools: dict[str, PoolCounts]
    breaker: str | None = None  # the breaker's last known state (bulkheads only)
    draining: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _is_terminal(stream: TextIO) -> bool:
    return stream.isatty() and os.environ.get("TERM", "") not in ("", "dumb")


class Progress:
    """Shows a run's progress on ``stream`` (stdout by default)."""

    def __init__(self, stream: TextIO | None = None, *, interval: float = 3.0) -> None:
        self.stream = stream or sys.stdout
        self.live = _is_terminal(self.stream)
        self.interval = interval  # seconds between lines when not on a terminal
        self._drawn = 0
        self._last_line = -1e9

    def say(self, text: str = "") -> None:
        """A line of text, below whatever was drawn so far."""
        self._drawn = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, label: str, snap: Snapshot, *, final: bool = False) -> None:
        if self.live:
            self._redraw(self._block(label, snap))
            if final:
                self._drawn = 0
            return
        now = time.monotonic()
        if final or now - self._last_line >= self.interval:
            self._last_line = now
            self.stream.write(self._line(label, snap) + "\n")
            self.stream.flush()

    # -- a terminal: a block redrawn in place ------------------------------------------

    def _redraw(self, lines: list[str]) -> None:
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # back to the block's first line
        for line in lines:
            out.append("\x1b[2K" + line + "\n")
        self.stream.write("".join(out))
        self.stream.flush()
        self._drawn = len(lines)

    def _block(self, label: str, snap: Snapshot) -> list[str]:
        done = min(max(snap.elapsed / snap.duration, 0.0), 1.0) if snap.duration else 1.0
        filled = round(done * _BAR)
        bar = "█" * filled + "░" * (_BAR - filled)
        if snap.elapsed < 0:
            when = "starting workers"
        elif snap.draining:
            when = f"{snap.duration:4.0f} s, draining"
        else:
            when = f"{snap.elapsed:4.1f} s / {snap.duration:.0f} s"
        downstream = snap.phase.upper() if snap.phase != "healthy" else "healthy"
        lines = [f"  [{bar}] {when:<22} webhooks' API: {downstream}"]
        for name, counts in snap.pools.items():
            line = (
                f"    {name:<9} sent {counts.sent:>4}  done {counts.done:>4}  "
                f"failed {counts.failed:>3}  waiting {counts.waiting:>4}"
            )
            if counts.refused:
                line += f"  refused {counts.refused:>3}"
            if name in snap.extra:
                line += f"  {snap.extra[name]}"
            lines.append(line)
        return lines

    # -- not a terminal: a line now and then -------------------------------------------

    def _line(self, label: str, snap: Snapshot) -> str:
        if snap.elapsed < 0:
            when = "starting"
        elif snap.draining:
            when = "draining"
        else:
            when = f"{snap.elapsed:.0f}/{snap.duration:.0f}s"
        parts = [f"  [{label}] {when:<9} api={snap.phase:<8}"]
        for name, counts in snap.pools.items():
            part = f"{name} {counts.done}/{counts.sent}"
            if counts.refused:
                part += f" (-{counts.refused})"
            parts.append(part)
        if snap.breaker:
            parts.append(f"breaker={snap.breaker}")
        return "  ".join(parts)
