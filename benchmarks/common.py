"""Shared benchmark plumbing: result rows, environment record, atomic JSON output, tables.

Every benchmark writes {"results": [row, ...], "env": {...}} where a row is
  {"name", "value", "unit", "baseline", "ratio", "target"}  (+ optional extra fields)
`ratio` is oriented so that higher is better; `target` is a number only where an issue sets one
(None otherwise); extra fields say what the baseline is (`baseline_is`) or give raw timings.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile

import torch


def result(name: str, value: float, unit: str, baseline: float | None, target: float | None = None,
           ratio: float | None = None, **extra) -> dict:
    """One row; ratio defaults to value / baseline."""
    if ratio is None and baseline:
        ratio = value / baseline
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            **extra}


def env_info(**extra) -> dict:
    """Machine and library versions (+ the benchmark's own settings in `extra`)."""
    from k2sys import ext

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "extensions": ext.summary()}
    info.update(extra)
    return info


def write_json(path: str, body: dict) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench.")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def print_results(results: list[dict], title: str | None = None) -> None:
    """The rows as a table: value, baseline, ratio and target (with ok / MISS where one is set)."""
    t = Table(["name", "value", "unit", "baseline", "ratio", "target"])
    for r in results:
        tgt = ""
        if r.get("target") is not None:
            tgt = f"{r['target']:.3g} {'ok' if (r['ratio'] or 0) >= r['target'] else 'MISS'}"
        t.add([r["name"], _fmt(r["value"]), r["unit"], _fmt(r["baseline"]), _fmt(r["ratio"]), tgt])
    if title:
        print(title)
    print(t.render())


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


class Table:
    def __init__(self, header: list[str]):
        self.rows = [header]

    def add(self, row: list[str]) -> None:
        self.rows.append([str(c) for c in row])

    def render(self) -> str:
        widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
