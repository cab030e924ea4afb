"""metrics.jsonl (one JSON object per record, appended and flushed) + TensorBoard events.

A resumed run first drops the records of work that was never committed (MetricsLog.keep_only): an
iteration cut by kill -9 is redone, and logged once.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"
        self._run_dir = run_dir
        self._f = self._open()
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is an optional extra ("report")
            self._tb = None

    def _open(self):
        f = open(self.path, "a+b")
        if f.tell() > 0:  # a line cut by kill -9: end it, or the next record would be glued onto it
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.close()
        return open(self.path, "a")

    def keep_only(self, keep) -> int:
        """Rewrite metrics.jsonl (atomically) with the records for which keep(record) is true, dropping
        cut lines too; returns how many records were dropped."""
        self._f.close()
        recs = read_metrics(self._run_dir)
        kept = [r for r in recs if keep(r)]
        n_lines = sum(1 for ln in open(self.path) if ln.strip()) if self.path.exists() else 0
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = self._open()
        return n_lines - len(kept)

    def log(self, kind: str, step: int, **values: Any) -> None:
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        self._f.write(json.dumps(rec, default=float) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by kill -9 mid-write
            continue
    return out
