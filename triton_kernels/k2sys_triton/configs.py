"""Tile configs for the fused MoE kernels: tuned JSON tables with a heuristic fallback.

A table is one JSON file per (E, N, device, dtype) under `configs/`, named
`E={E},N={N},device_name={device},dtype={dtype}.json`, where E is the local expert count,
N the per-expert intermediate size (w2.shape[2]), device the CUDA device name with spaces
replaced by underscores (e.g. NVIDIA_H200) and dtype one of DTYPE_KEYS. Its body:

  {"meta": {... how it was tuned ...},
   "configs": {"<tokens>": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                            "num_warps": 4, "num_stages": 3}, ...}}

`benchmarks/tune_moe.py` writes these on a GPU. Lookup takes the entry whose token count is
nearest to the call's; with no table for the key, `heuristic_config` picks tiles from the
average number of tokens per expert (small blocks for decode, large for prefill).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MoEKernelConfig",
    "DTYPE_KEYS",
    "CONFIG_DIR",
    "dtype_key",
    "device_name",
    "config_filename",
    "load_config_table",
    "save_config_table",
    "heuristic_config",
    "get_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPE_KEYS = ("fp32", "fp16", "bf16", "fp8_w8a16_block128")
_POW2_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")


@dataclass(frozen=True)
class MoEKernelConfig:
    """Tiles of the grouped GEMMs. BLOCK_M is also the align block size."""

    BLOCK_M: int = 64
    """rows (token-expert pairs) per program; power of two >= 16 (tl.dot needs 16 on GPU)"""
    BLOCK_N: int = 64
    """output columns per program; power of two >= 16"""
    BLOCK_K: int = 64
    """reduction step; power of two >= 16 (<= 128 with fp8 block scales)"""
    GROUP_M: int = 8
    """programs along M that share a column band, for L2 reuse of the weight tiles"""
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in _POW2_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 16 or v & (v - 1):
                raise ValueError(f"MoEKernelConfig.{name}={v!r} must be a power of two >= 16")
        if not isinstance(self.GROUP_M, int) or self.GROUP_M < 1:
            raise ValueError(f"MoEKernelConfig.GROUP_M={self.GROUP_M!r} must be an int >= 1")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"MoEKernelConfig.num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"MoEKernelConfig.num_stages={self.num_stages!r} must be an int in [1, 8]")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEKernelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"MoEKernelConfig: unknown keys {sorted(unknown)}; allowed {sorted(known)}")
        return cls(**d)


def dtype_key(dtype: torch.dtype, fp8_block_scaled: bool = False) -> str:
    """Table key of an activation dtype (fp8 weights use their own key)."""
    if fp8_block_scaled:
        return "fp8_w8a16_block128"
    keys = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    if dtype not in keys:
        raise ValueError(f"no MoE config key for dtype {dtype}; use float32, float16 or bfloat16")
    return keys[dtype]


def device_name(device: torch.device | None = None) -> str:
    """Device part of a table name: the CUDA device name with spaces as underscores, or 'cpu'."""
    if device is not None and torch.device(device).type != "cuda":
        return "cpu"
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device).replace(" ", "_")


def config_filename(E: int, N: int, device: str, dtype: str) -> str:
    if dtype not in DTYPE_KEYS:
        raise ValueError(f"dtype key {dtype!r} must be one of {DTYPE_KEYS}")
    return f"E={E},N={N},device_name={device},dtype={dtype}.json"


@functools.lru_cache(maxsize=64)
def _read_table(path: str, mtime: float) -> dict[int, MoEKernelConfig]:
    with open(path) as f:
        body = json.load(f)
    if not isinstance(body, dict) or not isinstance(body.get("configs"), dict):
        raise ValueError(f"{path}: expected {{'meta': ..., 'configs': {{tokens: config}}}}")
    try:
        return {int(m): MoEKernelConfig.from_dict(c) for m, c in body["configs"].items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad config table ({e}); re-run benchmarks/tune_moe.py") from e


def load_config_table(E: int, N: int, device: str, dtype: str, config_dir: Path | None = None):
    """The tuned table {tokens: config} for the key, or None when no file exists."""
    path = Path(config_dir or CONFIG_DIR) / config_filename(E, N, device, dtype)
    if not path.is_file():
        return None
    return _read_table(str(path), path.stat().st_mtime)


def save_config_table(
    table: dict[int, MoEKernelConfig], E: int, N: int, device: str, dtype: str, meta: dict,
    config_dir: Path | None = None,
) -> Path:  # fmt: skip
    """Write a table atomically (temp file + os.replace) and return its path."""
    if not table:
        raise ValueError("save_config_table: empty table; tune at least one token count")
    out_dir = Path(config_dir or CONFIG_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / config_filename(E, N, device, dtype)
    body = {"meta": meta, "configs": {str(m): table[m].to_dict() for m in sorted(table)}}
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def heuristic_config(num_tokens: int, E: int, top_k: int, dtype: str) -> MoEKernelConfig:
    """Fallback tiles from the average tokens per expert (what a row block can be filled with)."""
    per_expert = num_tokens * top_k / max(E, 1)
    block_k = 128 if dtype == "fp8_w8a16_block128" else 64
    if per_expert <= 16:  # decode: blocks are mostly padding, keep them short and the grid wide
        return MoEKernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return MoEKernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=3)
    if per_expert <= 256:
        return MoEKernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)
    return MoEKernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


def get_config(
    num_tokens: int, E: int, N: int, top_k: int, dtype: str, device: str | None = None,
    config_dir: Path | None = None,
) -> MoEKernelConfig:  # fmt: skip
    """Tuned config nearest in token count for (E, N, device, dtype), else the heuristic."""
    table = load_config_table(E, N, device or device_name(), dtype, config_dir)
    if table:
        nearest = min(table, key=lambda m: (abs(m - num_tokens), m))
        return table[nearest]
    return heuristic_config(num_tokens, E, top_k, dtype)
