"""A one-line progress display for long synthesis stages (stderr; redrawn in place on a terminal,
one line every `interval_s` otherwise, so logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    def __init__(self, label: str, total: int = 0, *, stream: TextIO | None = None, interval_s: float = 2.0,
                 enabled: bool = True):
        self.label, self.total, self.done, self.ok, self.failed = label, total, 0, 0, 0
        self.extra: dict[str, Any] = {}
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.tty else interval_s
        self.enabled = enabled
        self.t0 = time.monotonic()
        self._last = 0.0

    def add_total(self, n: int) -> None:
        self.total += n

    def step(self, ok: bool = True, **extra: Any) -> None:
        self.done += 1
        self.ok += bool(ok)
        self.failed += not ok
        for k, v in extra.items():
            self.extra[k] = self.extra.get(k, 0) + v if isinstance(v, (int, float)) else v
        self.show()

    def line(self) -> str:
        dt = max(1e-9, time.monotonic() - self.t0)
        rate = self.done / dt
        eta = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0.0
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (f"[{self.label}] {self.done}/{self.total} ok={self.ok} failed={self.failed} {extra} "
                f"{rate:.2f}/s elapsed={dt:.0f}s eta={eta:.0f}s").replace("  ", " ")

    def show(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self.interval_s and self.done < self.total:
            return
        self._last = now
        line = self.line()
        if not self.tty and line.split(" elapsed=")[0] == getattr(self, "_shown", None):
            return   # nothing new since the last line (close() after the last step)
        self._shown = line.split(" elapsed=")[0]
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.show(force=True)
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
