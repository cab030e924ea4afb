"""Tile configs for the fused MoE kernels: tuned JSON tables with a heuristic fallback.

A table is one JSON file per (E, N, device, dtype, triton version) under `configs/`, named
`E={E},N={N},device_name={device},dtype={dtype},triton={version}.json`, where E is the local
expert count, N the per-expert intermediate size (w2.shape[2]), device the CUDA device name with
spaces replaced by underscores (e.g. NVIDIA_H200), dtype one of DTYPE_KEYS and version the
`triton.__version__` it was tuned with (tiles that were fastest under one compiler release are not
trusted under another). Its body (format TABLE_FORMAT):

  {"format": "k2sys-moe-configs-v2",
   "key": {"E": 48, "N": 2048, "device_name": "NVIDIA_H200", "dtype": "bf16", "triton": "3.9.0"},
   "meta": {... how it was tuned; "capability": [9, 0] ...},
   "configs": {"<tokens>": {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                            "num_warps": 4, "num_stages": 3}, ...}}

`benchmarks/tune_moe.py` writes these on a GPU. Lookup (`get_config`) takes the entry whose token
count is nearest to the call's. Without a usable table for the exact key it falls back to
`heuristic_config` (tiles from the average number of tokens per expert) and logs why, once per key
and reason, on the `k2sys.kernels` logger: no table (INFO), or a table for another triton version,
an unversioned (v1) table, or a malformed one (WARNING).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "MoEKernelConfig",
    "DTYPE_KEYS",
    "CONFIG_DIR",
    "TABLE_FORMAT",
    "TableLookup",
    "dtype_key",
    "device_name",
    "triton_version",
    "config_filename",
    "parse_config_filename",
    "find_config_table",
    "list_config_tables",
    "load_config_table",
    "save_config_table",
    "heuristic_config",
    "accumulators_per_thread",
    "MAX_ACCUMULATORS_PER_THREAD",
    "FP8_NATIVE_ARCH",
    "get_config",
]

log = logging.getLogger("k2sys.kernels")

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DTYPE_KEYS = ("fp32", "fp16", "bf16", "fp8_w8a16_block128")
TABLE_FORMAT = "k2sys-moe-configs-v2"
_POW2_FIELDS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_NAME_RE = re.compile(r"^E=(\d+),N=(\d+),device_name=([^,]+),dtype=([^,]+?)(?:,triton=([^,]+))?\.json$")


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


@functools.cache
def triton_version() -> str:
    """The installed triton's version (the table key's `triton` part), or 'none' without triton."""
    try:
        import triton
    except ImportError:
        return "none"
    return str(triton.__version__)


def config_filename(E: int, N: int, device: str, dtype: str, triton: str | None = None) -> str:
    """Table file name of a key; triton None = the installed version."""
    if dtype not in DTYPE_KEYS:
        raise ValueError(f"dtype key {dtype!r} must be one of {DTYPE_KEYS}")
    return f"E={E},N={N},device_name={device},dtype={dtype},triton={triton or triton_version()}.json"


def parse_config_filename(name: str) -> dict | None:
    """{E, N, device_name, dtype, triton (None for an unversioned v1 name)} of a table file name."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    return {"E": int(m[1]), "N": int(m[2]), "device_name": m[3], "dtype": m[4], "triton": m[5]}


@functools.lru_cache(maxsize=64)
def _read_table(path: str, mtime: float) -> tuple[dict[int, MoEKernelConfig], dict]:
    """(table, meta) of a v2 file; ValueError naming the file and the fix for anything else."""
    name = os.path.basename(path)
    key = parse_config_filename(name)
    fix = "re-run benchmarks/tune_moe.py on that device"
    try:
        with open(path) as f:
            body = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable config table ({e}); {fix}") from e
    if not isinstance(body, dict) or body.get("format") != TABLE_FORMAT:
        got = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise ValueError(f"{path}: format {got!r}, expected {TABLE_FORMAT!r} (an unversioned table?); {fix}")
    if key is None or body.get("key") != key:
        raise ValueError(f"{path}: body key {body.get('key')} does not match the file name {name}; {fix}")
    if not isinstance(body.get("configs"), dict) or not body["configs"]:
        raise ValueError(f"{path}: expected a non-empty 'configs' {{tokens: config}}; {fix}")
    try:
        table = {int(m): MoEKernelConfig.from_dict(c) for m, c in body["configs"].items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad config table ({e}); {fix}") from e
    return table, dict(body.get("meta") or {})


@dataclass(frozen=True)
class TableLookup:
    """Result of looking a key up: the table, or None and the reason it cannot be used."""

    table: dict[int, MoEKernelConfig] | None
    path: Path | None
    reason: str
    severity: int = logging.INFO


def find_config_table(E: int, N: int, device: str, dtype: str, config_dir: Path | None = None,
                      triton: str | None = None) -> TableLookup:
    """The usable table for the exact key (triton None = the installed version), or why there is none."""
    root = Path(config_dir or CONFIG_DIR)
    version = triton or triton_version()
    path = root / config_filename(E, N, device, dtype, version)
    if path.is_file():
        try:
            return TableLookup(_read_table(str(path), path.stat().st_mtime)[0], path, "")
        except ValueError as e:
            return TableLookup(None, path, f"{e}; using the heuristic", logging.WARNING)
    stem = f"E={E},N={N},device_name={device},dtype={dtype}"
    others = sorted(p.name for p in root.glob(f"{stem},triton=*.json")) if root.is_dir() else []
    if others:
        versions = ", ".join(parse_config_filename(n)["triton"] for n in others if parse_config_filename(n))
        return TableLookup(None, root / others[0], f"{stem}: tuned tables exist for triton {versions} only, this is "
                           f"triton {version}; using the heuristic (re-run benchmarks/tune_moe.py)", logging.WARNING)
    legacy = root / f"{stem}.json"
    if legacy.is_file():
        return TableLookup(None, legacy, f"{legacy.name} is an unversioned table (no triton version in its key); "
                           "using the heuristic (re-run benchmarks/tune_moe.py)", logging.WARNING)
    return TableLookup(None, None, f"no tuned table for {stem} under triton {version} in {root}; using the heuristic")


def list_config_tables(config_dir: Path | None = None) -> list[tuple[Path, dict, dict | None, str]]:
    """Every table-like file in the folder: (path, key from the name, meta or None, error or '')."""
    root = Path(config_dir or CONFIG_DIR)
    out = []
    for path in sorted(root.glob("E=*.json")) if root.is_dir() else []:
        key = parse_config_filename(path.name)
        if key is None:
            out.append((path, {}, None, f"{path.name}: not a config table name"))
            continue
        try:
            _, meta = _read_table(str(path), path.stat().st_mtime)
            out.append((path, key, meta, ""))
        except ValueError as e:
            out.append((path, key, None, str(e)))
    return out


def load_config_table(E: int, N: int, device: str, dtype: str, config_dir: Path | None = None,
                      triton: str | None = None) -> dict[int, MoEKernelConfig] | None:
    """The tuned table {tokens: config} for the key, None when no file exists; ValueError when the file is
    not a valid v2 table (strict: for tools; kernels use get_config, which falls back instead)."""
    path = Path(config_dir or CONFIG_DIR) / config_filename(E, N, device, dtype, triton)
    if not path.is_file():
        return None
    return _read_table(str(path), path.stat().st_mtime)[0]


def save_config_table(
    table: dict[int, MoEKernelConfig], E: int, N: int, device: str, dtype: str, meta: dict,
    config_dir: Path | None = None, triton: str | None = None,
) -> Path:  # fmt: skip
    """Write a v2 table atomically (temp file + os.replace) and return its path. meta should hold
    "capability": [major, minor] of the device (the compile check compiles the table for that arch)."""
    if not table:
        raise ValueError("save_config_table: empty table; tune at least one token count")
    out_dir = Path(config_dir or CONFIG_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    version = triton or triton_version()
    path = out_dir / config_filename(E, N, device, dtype, version)
    key = {"E": E, "N": N, "device_name": device, "dtype": dtype, "triton": version}
    body = {"format": TABLE_FORMAT, "key": key, "meta": meta,
            "configs": {str(m): table[m].to_dict() for m in sorted(table)}}
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


# GEMM1 holds two fp32 accumulators (gate and up) of BLOCK_M x BLOCK_N, spread over the block's
# threads. Above 64 accumulator values per thread ptxas spills in the training variant (which also
# stores the pre-activations) on sm_90 and in every variant on sm_80 (`k2sys kernels compile`
# measured: 64x128 on 4 warps and 128x128 on 8 warps spill; 64x128 and 128x64 on 8 warps do not).
MAX_ACCUMULATORS_PER_THREAD = 64
# First compute capability with fp8 (e4m3) types in triton; older GPUs read fp8 weights as bits.
FP8_NATIVE_ARCH = 89


def accumulators_per_thread(cfg: MoEKernelConfig) -> int:
    """fp32 accumulator values each thread holds in the fused gate/up GEMM of `cfg`."""
    return 2 * cfg.BLOCK_M * cfg.BLOCK_N // (32 * cfg.num_warps)


def heuristic_config(num_tokens: int, E: int, top_k: int, dtype: str, arch: int | None = None) -> MoEKernelConfig:
    """Fallback tiles from the average tokens per expert (what a row block can be filled with).

    Every config here compiles for sm_80 and sm_90 without spills for every kernel role (the CI's
    compile check covers it). fp32 runs IEEE dots on the FMA units, whose operands sit in registers
    too: its tiles are smaller. `arch` (compute capability, None = unknown) matters for fp8 weights
    only: before sm_89 the kernel decodes them from bits, which needs more registers per tile."""
    per_expert = num_tokens * top_k / max(E, 1)
    if dtype == "fp32":
        if per_expert <= 16:
            return MoEKernelConfig(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, num_warps=4, num_stages=2)
        if per_expert <= 64:
            return MoEKernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2)
        return MoEKernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, num_warps=8, num_stages=2)
    block_k = 128 if dtype == "fp8_w8a16_block128" else 64
    if per_expert <= 16:  # decode: blocks are mostly padding, keep them short and the grid wide
        return MoEKernelConfig(BLOCK_M=16, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=1, num_warps=4, num_stages=3)
    if per_expert <= 64:
        return MoEKernelConfig(BLOCK_M=32, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8, num_warps=4, num_stages=3)
    if dtype == "fp8_w8a16_block128" and arch is not None and arch < FP8_NATIVE_ARCH:
        return MoEKernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=16, num_stages=3)
    if per_expert <= 256:
        return MoEKernelConfig(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return MoEKernelConfig(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)


_LOGGED: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=256)
def _cached_lookup(E, N, device, dtype, root, version, stamp) -> TableLookup:
    return find_config_table(E, N, device, dtype, Path(root), version)


def get_config(
    num_tokens: int, E: int, N: int, top_k: int, dtype: str, device: str | None = None,
    config_dir: Path | None = None, arch: int | None = None,
) -> MoEKernelConfig:  # fmt: skip
    """Tuned config nearest in token count for (E, N, device, dtype, triton version), else the
    heuristic (for compute capability `arch`); a fallback is logged once per key and reason."""
    dev = device or device_name()
    root = Path(config_dir or CONFIG_DIR)
    try:
        stamp = root.stat().st_mtime_ns  # a table written or removed (os.replace) changes the folder's mtime
    except OSError:
        stamp = -1
    found = _cached_lookup(E, N, dev, dtype, str(root), triton_version(), stamp)
    if found.table:
        nearest = min(found.table, key=lambda m: (abs(m - num_tokens), m))
        return found.table[nearest]
    tag = (f"{E},{N},{dev},{dtype},{root}", found.reason)
    if tag not in _LOGGED:
        _LOGGED.add(tag)
        log.log(found.severity, "MoE tile config: %s", found.reason)
    return heuristic_config(num_tokens, E, top_k, dtype, arch)
