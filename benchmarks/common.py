"""Shared benchmark plumbing: environment record, atomic JSON output, a plain-text table."""

from __future__ import annotations

import json
import os
import platform
import tempfile

import torch


def env_info() -> dict:
    from k2sys import ext

    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "extensions": ext.summary()}
    return info


def write_json(path: str, body: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench.")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


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
