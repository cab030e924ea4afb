"""Reading HF checkpoints as they are released: exact, lazy, per-slice.

`HFCheckpoint(path)` opens a DeepSeek-V3 / Kimi-K2 directory (config.json, model.safetensors or a
sharded model.safetensors.index.json) without reading any tensor. Every tensor is then read on
demand, whole or as a box (rows x cols), straight from the file with positioned reads: a trainer
rank that owns a quarter of a matrix reads a quarter of its bytes, and nothing is memory-mapped,
so page cache never counts against the rank's RSS.

FP8 block-scaled weights (quantization_config {quant_method: fp8, fmt: e4m3, weight_block_size:
[128, 128]}; `X.weight` float8_e4m3fn + `X.weight_scale_inv` float32 [ceil(out/128), ceil(in/128)],
partial edge blocks allowed) are dequantized exactly by the release formula
`w = float32(q) * scale_inv[i // 128, j // 128]` (then cast to the requested dtype), or handed out
raw (`read_raw`) to consumers that compute in FP8.

What cannot be placed exactly is an error naming the tensor or field: an unknown quant_method, a
float8 tensor without its scale (or a scale without its weight, or one of the wrong shape), a
tensor the config does not account for, an integer-packed weight. Never a cast that guesses.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from k2sys.models.config import ConfigError, FP8Block, K2Config

SCALE_SUFFIX = "_scale_inv"
FP8_MAX = 448.0

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Row chunk for reads of a column slice: bounds the scratch memory of one read (bytes).
_SCRATCH_BYTES = 16 << 20


class CheckpointError(ValueError):
    """The checkpoint cannot be read exactly; the message names the file/tensor/field and the fix."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def dequantize_box(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], offsets: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float32(q) * scale per tile, for a box of a weight starting at `offsets` (q is the box's values,
    `scale` the scale rows/cols covering it, starting at the tile holding `offsets`)."""
    r0, c0 = offsets
    rows, cols = q.shape
    ri = (torch.arange(rows) + r0) // block[0] - r0 // block[0]
    ci = (torch.arange(cols) + c0) // block[1] - c0 // block[1]
    s = scale.to(torch.float32)[ri][:, ci]
    out = q.to(torch.float32) * s
    return out if dtype == torch.float32 else out.to(dtype)


# ---- safetensors files, read with positioned reads -----------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    """Absolute byte offset of the data in the file."""
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes; the file is corrupt")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: safetensors header is not JSON ({e}); the file is corrupt") from None
    size = path.stat().st_size
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        st = meta.get("dtype")
        if st not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has safetensors dtype {st!r}, which k2sys cannot read")
        dtype = _ST_DTYPES[st]
        shape = tuple(int(s) for s in meta["shape"])
        b, e = (int(x) for x in meta["data_offsets"])
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if e - b != nbytes or 8 + n + e > size:
            raise CheckpointError(f"{path}: tensor {name} {st}{list(shape)} spans bytes [{b}, {e}) which does not "
                                  f"match its shape or the file size {size}; the file is truncated or corrupt")
        out[name] = TensorInfo(path, dtype, shape, 8 + n + b, nbytes)
    return out


def _readinto(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + got}")
        got += n


class _Files:
    """Open file descriptors of a checkpoint's shards, shared by threads (pread is thread-safe)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_box(files: _Files, info: TensorInfo, offsets: tuple[int, ...] | None = None,
             sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """The box [offsets, offsets + sizes) of a stored tensor, reading only the bytes it needs
    (whole rows in bounded chunks when the box is a column slice of a 2-D tensor)."""
    shape = info.shape
    if offsets is None:
        offsets, sizes = (0,) * len(shape), shape
    if len(offsets) != len(shape) or any(o < 0 or o + s > n for o, s, n in zip(offsets, sizes, shape)):
        raise CheckpointError(f"{info.file}: box offsets {offsets} sizes {sizes} outside the tensor {list(shape)}")
    es = torch.empty((), dtype=info.dtype).element_size()
    fd = files.fd(info.file)
    out = torch.empty(sizes, dtype=info.dtype)
    if out.numel() == 0:
        return out
    # Leading dims fully taken after the first partial one make the box one contiguous run per row.
    row_elems = math.prod(shape[1:]) if len(shape) > 1 else 1
    inner_full = tuple(offsets[1:]) == (0,) * (len(shape) - 1) and tuple(sizes[1:]) == tuple(shape[1:])
    if len(shape) <= 1 or inner_full:
        start = info.offset + offsets[0] * row_elems * es if shape else info.offset
        _readinto(fd, memoryview(out.view(torch.uint8).numpy()).cast("B"), start, info.file)
        return out
    if len(shape) != 2:
        raise CheckpointError(f"{info.file}: only row boxes of {len(shape)}-D tensors can be read, got "
                              f"offsets {offsets} sizes {sizes}")
    r0, c0 = offsets
    nr, nc = sizes
    row_bytes = shape[1] * es
    chunk = max(1, _SCRATCH_BYTES // row_bytes)
    scratch = torch.empty((min(chunk, nr), shape[1]), dtype=info.dtype)
    for r in range(0, nr, chunk):
        k = min(chunk, nr - r)
        view = scratch[:k]
        _readinto(fd, memoryview(view.view(torch.uint8).numpy()).cast("B")[: k * row_bytes],
                  info.offset + (r0 + r) * row_bytes, info.file)
        out[r:r + k].copy_(view[:, c0:c0 + nc])
    return out


# ---- the checkpoint -------------------------------------------------------------------------------------
def _is_extra_layer(name: str, n_layers: int) -> bool:
    """MTP / next-n layers (DeepSeek-V3's layer 61) beyond num_hidden_layers; transformers ignores them too."""
    parts = name.split(".")
    return len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and int(parts[2]) >= n_layers


class HFCheckpoint(Mapping[str, torch.Tensor]):
    """A released HF DeepseekV3 / Kimi-K2 checkpoint, read lazily and exactly.

    As a Mapping it yields the model's tensors by HF name, dequantized to `dtype` (None: fp8 weights
    become the config's torch_dtype, other tensors keep their stored dtype), so it can stand wherever a
    state dict is read tensor by tensor. `read(name, box)` reads a slice; `read_raw` returns stored bytes.
    """

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype | None = None):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"{self.path}: missing config.json (not an HF checkpoint directory)")
        self.raw_config: dict[str, Any] = json.loads(cfg_path.read_text())
        self.config = K2Config.from_hf_dict(self.raw_config)
        self.quant = FP8Block.from_config(self.raw_config.get("quantization_config"))
        self.dtype = dtype
        self._files = _Files()
        self.tensors: dict[str, TensorInfo] = {}
        for f in self._shard_files():
            for name, info in read_safetensors_header(f).items():
                if name in self.tensors:
                    raise CheckpointError(f"{self.path}: tensor {name} is stored twice ({self.tensors[name].file.name} "
                                          f"and {f.name})")
                self.tensors[name] = info
        self._names = self._check_names()

    # -- layout ---------------------------------------------------------------------------------------
    def _shard_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index}: no weight_map; the index is corrupt")
            files = [self.path / f for f in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {missing[:4]}")
            return files
        single = self.path / "model.safetensors"
        if not single.exists():
            raise FileNotFoundError(f"{self.path}: no model.safetensors or model.safetensors.index.json "
                                    "(not an HF safetensors checkpoint)")
        return [single]

    def _check_names(self) -> list[str]:
        from k2sys.models.reference import param_shapes

        cfg = self.config
        shapes = param_shapes(cfg)
        stored = {n for n in self.tensors if not _is_extra_layer(n, cfg.num_hidden_layers)}
        scales = {n for n in stored if n.endswith(SCALE_SUFFIX)}
        weights = stored - scales
        problems = []
        missing = sorted(set(shapes) - weights)
        unexpected = sorted(weights - set(shapes))
        if missing:
            problems.append(f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}")
        if unexpected:
            problems.append(f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        if problems:
            raise CheckpointError(f"{self.path}: checkpoint does not match config.json: {', '.join(problems)}")
        for name in sorted(weights):
            info = self.tensors[name]
            if info.shape != tuple(shapes[name]):
                raise CheckpointError(f"{self.path}: {name} is stored as {list(info.shape)}, config.json implies "
                                      f"{list(shapes[name])}")
            scale = name + SCALE_SUFFIX if name.endswith(".weight") else None
            has_scale = scale in scales
            if info.dtype == torch.float8_e4m3fn:
                if self.quant is None:
                    raise CheckpointError(f"{self.path}: {name} is float8_e4m3fn but config.json has no "
                                          "quantization_config; the scales cannot be placed")
                if not has_scale:
                    raise CheckpointError(f"{self.path}: {name} is float8_e4m3fn without {name}{SCALE_SUFFIX}; "
                                          "an FP8 weight without its block scales cannot be read exactly")
                sinfo = self.tensors[scale]
                want = self.quant.scale_shape(info.shape)
                if sinfo.shape != want or sinfo.dtype not in _FLOATS:
                    raise CheckpointError(f"{self.path}: {scale} is {sinfo.dtype} {list(sinfo.shape)}; block "
                                          f"{list(self.quant.block)} scales of {name} {list(info.shape)} must be a "
                                          f"float tensor of shape {list(want)}")
            elif info.dtype not in _FLOATS:
                raise CheckpointError(f"{self.path}: {name} is stored as {info.dtype}, which k2sys cannot read as "
                                      "model weights (packed-integer quantization is not supported)")
            elif has_scale:
                raise CheckpointError(f"{self.path}: {scale} scales {name}, which is stored as {info.dtype}, not FP8; "
                                      "the checkpoint is inconsistent")
        orphans = sorted(s for s in scales if s[: -len(SCALE_SUFFIX)] not in weights)
        if orphans:
            raise CheckpointError(f"{self.path}: scales without a weight: {orphans[:5]}")
        return sorted(shapes)

    # -- queries --------------------------------------------------------------------------------------
    def is_fp8(self, name: str) -> bool:
        return self.tensors[name].dtype == torch.float8_e4m3fn

    @property
    def has_fp8(self) -> bool:
        return any(self.is_fp8(n) for n in self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def out_dtype(self, name: str, dtype: torch.dtype | None = None) -> torch.dtype:
        dtype = dtype or self.dtype
        if dtype is not None:
            return dtype
        if self.is_fp8(name):

            return resolve_dtype(self.config.torch_dtype)
        return self.tensors[name].dtype

    def nbytes(self, names: Iterable[str] | None = None) -> int:
        """Bytes stored on disk for these tensors (with their scales)."""
        total = 0
        for n in names or self._names:
            total += self.tensors[n].nbytes
            if n + SCALE_SUFFIX in self.tensors:
                total += self.tensors[n + SCALE_SUFFIX].nbytes
        return total

    # -- reads ----------------------------------------------------------------------------------------
    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors or name not in self._names_set:
            raise KeyError(f"{self.path}: no model tensor {name!r}")
        return self.tensors[name]

    @property
    def _names_set(self) -> set[str]:
        s = getattr(self, "_names_set_cache", None)
        if s is None:
            s = self._names_set_cache = set(self._names)
        return s

    def read(self, name: str, offsets: tuple[int, ...] | None = None, sizes: tuple[int, ...] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """Tensor `name` (or its box), dequantized exactly when stored as FP8, as `dtype`."""
        info = self._info(name)
        want = self.out_dtype(name, dtype)
        if offsets is None:
            offsets, sizes = (0,) * len(info.shape), info.shape
        if info.dtype != torch.float8_e4m3fn:
            t = read_box(self._files, info, tuple(offsets), tuple(sizes))
            return t if t.dtype == want else t.to(want)
        q = read_box(self._files, info, tuple(offsets), tuple(sizes))
        b = self.quant.block
        sinfo = self.tensors[name + SCALE_SUFFIX]
        (r0, c0), (nr, nc) = offsets, sizes
        s_off = (r0 // b[0], c0 // b[1])
        s_end = (math.ceil((r0 + nr) / b[0]) if nr else s_off[0], math.ceil((c0 + nc) / b[1]) if nc else s_off[1])
        s = read_box(self._files, sinfo, s_off, (s_end[0] - s_off[0], s_end[1] - s_off[1]))
        return dequantize_box(q, s, b, (r0, c0), want)

    def read_raw(self, name: str) -> torch.Tensor:
        """The stored tensor as is (FP8 weights stay float8; their scales are `name + '_scale_inv'`)."""
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        return read_box(self._files, self.tensors[name])

    def raw_state_dict(self) -> dict[str, torch.Tensor]:
        """Model tensors as stored, FP8 weights with their `weight_scale_inv` entries (release layout)."""
        out = {}
        for n in self._names:
            out[n] = self.read_raw(n)
            if self.is_fp8(n):
                out[n + SCALE_SUFFIX] = self.read_raw(n + SCALE_SUFFIX)
        return out

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {n: self.read(n, dtype=dtype) for n in self._names}

    def close(self) -> None:
        self._files.close()

    def __del__(self) -> None:
        try:
            self._files.close()
        except Exception:
            pass

    # -- Mapping --------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names_set
