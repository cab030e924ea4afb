"""What a k2sys command prints: our own progress, not the libraries'.

`setup(verbose)` runs once at the start of each command. By default only k2sys's loggers speak at
INFO; third-party loggers (megatron-core's bucket lists and config reprs, httpx, ...) are held at
WARNING, and the warnings known to be harmless on the machines we support are filtered. `--verbose`
(or K2SYS_VERBOSE=1, which child processes inherit) brings everything back.

`Progress` is one display per stage (SFT steps, RL iterations): a tqdm bar with the stage's figures
and ETA when stderr is a terminal; one log line per update otherwise (log files, SLURM, CI), since a
redrawn bar is unreadable there.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import Any

VERBOSE_ENV = "K2SYS_VERBOSE"
FORMAT = "%(asctime)s %(name)s %(message)s"

# (message regex, why it is harmless): printed by megatron-core or torch at import or model build.
HARMLESS_WARNINGS = (
    (r"Transformer Engine and Apex are not installed", "CPU and plain-GPU installs use megatron's torch fallbacks"),
    (r"Apex is not installed", "megatron falls back to torch norms, which k2sys checks against the reference"),
    (r"full scope is deprecated", "megatron's own default for cuda_graph_scope; k2sys does not capture graphs"),
    (r"Using Megatron-FSDP without Transformer Engine", "k2sys does not use Megatron-FSDP"),
    (r"TypedStorage is deprecated", "raised inside torch.distributed.checkpoint"),
)


def verbose_requested(argv: list[str] | None = None) -> bool:
    env = os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    return env or (argv is not None and "--verbose" in argv)


def setup(verbose: bool = False, level: int = logging.INFO) -> None:
    """Configure logging and warnings for a k2sys command (idempotent)."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # torchrun ranks and the engine server inherit it
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level if verbose else logging.WARNING)
    logging.getLogger("k2sys").setLevel(level)
    if not verbose:
        for pattern, _why in HARMLESS_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)


def _duration(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Progress of one stage: `update(done, **figures)` after each step; `close()` at the end.

    `done` counts from the start of the run (a resumed run starts at the step it resumed from), the
    ETA from this process's own rate, so a resume does not inflate or deflate it."""

    def __init__(self, stage: str, total: int, unit: str = "step", *, start: int = 0,
                 logger: logging.Logger | None = None, stream: Any = None):
        self.stage, self.total, self.unit = stage, int(total), unit
        self.start, self.t0 = int(start), time.perf_counter()
        self.log = logger or logging.getLogger("k2sys.progress")
        stream = stream if stream is not None else sys.stderr
        self._bar = None
        if getattr(stream, "isatty", lambda: False)() and not verbose_requested():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.start, desc=stage, unit=unit, file=stream,
                             dynamic_ncols=True, leave=True)

    def eta_s(self, done: int) -> float:
        ran = done - self.start
        if ran <= 0:
            return math.nan
        return (time.perf_counter() - self.t0) / ran * max(self.total - done, 0)

    def line(self, done: int, figures: dict[str, float | int]) -> str:
        parts = [f"{self.stage} {self.unit} {done}/{self.total}"]
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()]
        ran = done - self.start
        if ran > 0:
            per = (time.perf_counter() - self.t0) / ran
            parts.append(f"{per:.1f} s/{self.unit} ETA {_duration(self.eta_s(done))}")
        return " | ".join(parts)

    def update(self, done: int, **figures: float | int) -> None:
        figures = {k: v for k, v in figures.items() if v is not None}
        if self._bar is not None:
            self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items()},
                                  refresh=False)
            self._bar.update(done - self._bar.n)
        else:
            self.log.info("%s", self.line(done, figures))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
