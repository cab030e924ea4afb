"""Startup loading: every rank reads a disjoint part of a safetensors checkpoint and the full set
is assembled on every rank by the same broadcast pipeline as a weight update.

    headers (all ranks, metadata only) -> assign tensors to ranks (contiguous, byte-balanced)
      -> each rank reads only its tensors -> update pipeline (hf pieces -> receiver's layout)

Every tensor's bytes are read from storage by exactly one rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from safetensors import safe_open

from k2sys.ckpt.layout import hf_layout
from k2sys.ckpt.pipeline import TrainerShards, UpdateReport, WeightUpdater
from k2sys.ckpt.sink import WeightSink
from k2sys.ckpt.types import TensorSpec, UpdateConfig

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class CheckpointTensor:
    file: str
    spec: TensorSpec


def checkpoint_files(path: str) -> list[str]:
    """The .safetensors files of a checkpoint directory (sorted), or [path] for a single file."""
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(f"load_checkpoint: no .safetensors files in {path}")
        return files
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist")
    return [path]


def read_index(files: Sequence[str]) -> list[CheckpointTensor]:
    out = []
    for f in files:
        with safe_open(f, framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                dt = sl.get_dtype()
                if dt not in _DTYPES:
                    raise ValueError(f"load_checkpoint: tensor {name} in {f} has unsupported dtype {dt}")
                out.append(CheckpointTensor(f, TensorSpec(name, tuple(sl.get_shape()), _DTYPES[dt])))
    return out


def assign_readers(index: Sequence[CheckpointTensor], world: int) -> list[list[CheckpointTensor]]:
    """Split the (file-ordered) tensor list into `world` contiguous runs of about equal bytes, so
    each rank reads few files and every tensor is read once."""
    total = sum(t.spec.nbytes for t in index)
    parts: list[list[CheckpointTensor]] = [[] for _ in range(world)]
    acc, r = 0, 0
    for t in index:
        # Move on once this rank holds its share (the last rank takes the rest).
        while r < world - 1 and acc >= total * (r + 1) / world:
            r += 1
        parts[r].append(t)
        acc += t.spec.nbytes
    return parts


def load_checkpoint(path: str, sink: WeightSink, *, group: Optional[dist.ProcessGroup] = None,
                    config: Optional[UpdateConfig] = None, device: str | torch.device = "cpu") -> UpdateReport:
    """Load an HF safetensors checkpoint into `sink` on every rank, each file byte read once.

    A checkpoint directory (config.json) is read through k2sys.models.checkpoint.HFCheckpoint: model
    tensors only, FP8 block-scaled weights dequantized exactly by the rank that reads them. A bare
    .safetensors file is read as stored; float8 tensors in it are refused (their scales cannot be placed)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tensors: dict[str, torch.Tensor] = {}
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
        from k2sys.models.checkpoint import HFCheckpoint

        ckpt = HFCheckpoint(path)
        # Read each tensor in the dtype the sink holds it (FP8 dequantized straight into it).
        layout = getattr(sink, "layout", None)
        want = {p.global_name: layout.tensors[p.local_name].dtype for p in layout.pieces} if layout else {}
        index = [CheckpointTensor(str(ckpt.tensors[n].file), TensorSpec(n, ckpt.shape(n), want.get(n) or ckpt.out_dtype(n)))
                 for n in sorted(ckpt, key=lambda n: (str(ckpt.tensors[n].file), ckpt.tensors[n].offset))]
        mine = assign_readers(index, world)[rank]
        for t in mine:
            tensors[t.spec.name] = ckpt.read(t.spec.name, dtype=t.spec.dtype)
        ckpt.close()
    else:
        index = read_index(checkpoint_files(path))
        fp8 = [t.spec.name for t in index if t.spec.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
        if fp8:
            raise ValueError(f"load_checkpoint: {path} holds float8 tensors ({fp8[:3]}); pass the checkpoint "
                             "directory (with config.json and its quantization_config) so their scales are applied")
        mine = assign_readers(index, world)[rank]
        by_file: dict[str, list[CheckpointTensor]] = {}
        for t in mine:
            by_file.setdefault(t.file, []).append(t)
        for f, lst in by_file.items():
            with safe_open(f, framework="pt") as h:
                for t in lst:
                    tensors[t.spec.name] = h.get_tensor(t.spec.name)
    layout = hf_layout({t.spec.name: t.spec.shape for t in mine}, {t.spec.name: t.spec.dtype for t in mine},
                       name=f"checkpoint part {rank}/{world}")
    shards = TrainerShards(layout, tensors)
    return WeightUpdater(group, config, device).update(shards, sink)
