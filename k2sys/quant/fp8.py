"""FP8 e4m3fn weights with block scales: the DeepSeek-V3 / Kimi-K2 release format.

A released checkpoint stores each quantized linear as `X.weight` (float8_e4m3fn) plus
`X.weight_scale_inv` (float32, [ceil(out/128), ceil(in/128)], partial edge blocks allowed):
    w[i, j] = float(q[i, j]) * scale_inv[i // 128, j // 128]

Quantization (one semantics, three bit-identical implementations):
    amax[I, J]      = max |w| over block (I, J), in fp32
    scale_inv[I, J] = amax / 448 (fp32 division); 1 where that is 0 (all-zero blocks)
    q[i, j]         = e4m3fn(clamp(w[i, j] / scale_inv[I, J], -448, 448)), round to nearest even
NaN or inf in w is an error naming the tensor.

    quantize_fp8_blocks(tensors)   a whole bucket in one native call: C++ thread pool on CPU
                                   (csrc/fp8_quant.cpp), one Triton launch per source dtype on
                                   CUDA (k2sys_triton.fp8_quant), the torch reference otherwise
    quantize_fp8_block(w)          one tensor, same backends
    quantize_fp8_block_reference   the vectorized torch definition (tests, fallback)
    dequantize_fp8_block(q, s)     float32(q) * expanded scale, then .to(dtype) (vectorized torch;
                                   the same values from one Triton pass on CUDA)
    is_fp8_weight_name(name)       whether the release quantizes this HF tensor
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from k2sys import ext

__all__ = [
    "FP8_DTYPE", "FP8_MAX", "FP8_BLOCK", "SCALE_SUFFIX", "is_fp8_weight_name", "scale_inv_name", "fp8_scale_shape",
    "quantize_fp8_block", "quantize_fp8_blocks", "quantize_fp8_block_reference", "dequantize_fp8_block",
    "quantize_fp8_state", "triton_available",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
FP8_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"
_SRC_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/fp8_quant.h QuantSrc
BACKENDS = ("auto", "cpp", "triton", "torch")

# Every Linear weight of attention and of the MLPs (dense, routed experts, shared experts); not
# embed_tokens, lm_head, norms, the router (mlp.gate.weight) or e_score_correction_bias.
_FP8_NAME = re.compile(
    r"(?:^|\.)(?:self_attn\.(?:q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(?:experts\.\d+\.|shared_experts\.)?(?:gate_proj|up_proj|down_proj))\.weight$"
)


def is_fp8_weight_name(hf_name: str) -> bool:
    """True for the HF tensors a DeepSeek-V3 / Kimi-K2 FP8 release stores as float8 + weight_scale_inv."""
    return bool(_FP8_NAME.search(hf_name))


def scale_inv_name(weight_name: str) -> str:
    """`X.weight` -> `X.weight_scale_inv` (the release's name for the block scales)."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"scale_inv_name: {weight_name!r} is not a `.weight` tensor name")
    return weight_name + SCALE_SUFFIX


def fp8_scale_shape(shape: Sequence[int], block: Sequence[int] = FP8_BLOCK) -> tuple[int, int]:
    """Shape of the scale_inv of a [rows, cols] weight: [ceil(rows / br), ceil(cols / bc)]."""
    rows, cols = shape
    return -(-int(rows) // int(block[0])), -(-int(cols) // int(block[1]))


def _check_block(block: Sequence[int]) -> tuple[int, int]:
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"block: expected two positive sizes like (128, 128), got {tuple(block)}")
    return int(block[0]), int(block[1])


def _pow2_block(b: int) -> bool:
    return b >= 16 and not b & (b - 1)


def _label(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None and i < len(names) else f"#{i}"


def _check_weight(w: torch.Tensor, label: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"quantize_fp8: tensor {label} is a {type(w).__name__}, not a torch.Tensor")
    if w.dim() != 2:
        raise ValueError(f"quantize_fp8: tensor {label} must be 2-D [out, in], got shape {tuple(w.shape)}")
    if w.dtype not in _SRC_CODES:
        raise ValueError(f"quantize_fp8: tensor {label} is {w.dtype}; pass float32, bfloat16 or float16 "
                         "(cast it explicitly first)")


def _nonfinite_error(label: str) -> ValueError:
    return ValueError(f"quantize_fp8: tensor {label} holds NaN or inf values, which fp8 cannot represent; "
                      "fix the weights before quantizing")


# ---------------------------------------------------------------- torch reference

def quantize_fp8_block_reference(w: torch.Tensor, block: Sequence[int] = FP8_BLOCK, *,
                                 name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, in vectorized torch: (q float8_e4m3fn [R, C], scale_inv fp32 [ceil(R/br), ceil(C/bc)])."""
    br, bc = _check_block(block)
    label = repr(name) if name is not None else "#0"
    _check_weight(w, label)
    R, C = w.shape
    nr, nc = fp8_scale_shape((R, C), (br, bc))
    if w.numel() == 0:
        return torch.empty(R, C, dtype=FP8_DTYPE, device=w.device), torch.ones(nr, nc, device=w.device)
    wf = w.float()
    if (nr * br, nc * bc) != (R, C):  # partial edge blocks: zero padding changes no amax
        wf = torch.nn.functional.pad(wf, (0, nc * bc - C, 0, nr * br - R))
    blocks = wf.view(nr, br, nc, bc)
    amax = blocks.abs().amax(dim=(1, 3))
    if not bool(torch.isfinite(amax).all()):
        raise _nonfinite_error(label)
    scale = amax / FP8_MAX
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).view(nr * br, nc * bc)[:R, :C]
    return q.to(FP8_DTYPE).contiguous(), scale.contiguous()


# ---------------------------------------------------------------- backends

def triton_available(device: torch.device) -> bool:
    """Whether the Triton quantizer can run on `device` (CUDA + triton, or CPU under TRITON_INTERPRET=1)."""
    try:
        from k2sys_triton._interp import HAS_TRITON, KERNELS_INTERPRETED
    except ImportError:
        return False
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and KERNELS_INTERPRETED)


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"quantize_fp8: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cpu" and ext.HAS_CPP:
            return "cpp"
        if device.type == "cuda" and triton_available(device):
            return "triton"
        return "torch"
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"quantize_fp8: backend 'cpp' runs on CPU tensors, got {device}; use auto or triton")
    if backend == "cpp":
        ext.require_cpp()
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"quantize_fp8: backend 'triton' cannot run on {device} here (needs triton and CUDA, "
                         "or TRITON_INTERPRET=1 set before import on CPU); use auto")
    return backend


def _quantize_cpp(ws: list[torch.Tensor], br: int, bc: int, threads: int,
                  names: Sequence[str] | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    outs = []
    for w in ws:
        R, C = w.shape
        outs.append((torch.empty(R, C, dtype=FP8_DTYPE), torch.empty(fp8_scale_shape((R, C), (br, bc)))))
    bad = ext.require_cpp().quantize_fp8_blocks_ptr(
        [w.data_ptr() for w in ws], [_SRC_CODES[w.dtype] for w in ws], [w.shape[0] for w in ws],
        [w.shape[1] for w in ws], [q.data_ptr() for q, _ in outs], [s.data_ptr() for _, s in outs],
        br, bc, threads)
    if bad >= 0:
        raise _nonfinite_error(_label(names, bad))
    return outs


def quantize_fp8_blocks(weights: Sequence[torch.Tensor], block: Sequence[int] = FP8_BLOCK, *,
                        names: Sequence[str] | None = None, threads: int = 0,
                        backend: str = "auto") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize a bucket of 2-D weights in one native call: [(q, scale_inv)] in input order.

    All tensors on one device. CPU: the C++ thread pool spreads every block of every tensor over
    `threads` workers (<= 0: all hardware threads). CUDA: one Triton launch per source dtype.
    `names` only labels errors. backend: auto, cpp, triton or torch (the reference, per tensor).
    """
    br, bc = _check_block(block)
    ws = list(weights)
    if names is not None and len(names) != len(ws):
        raise ValueError(f"quantize_fp8_blocks: {len(names)} names for {len(ws)} tensors")
    if not ws:
        return []
    for i, w in enumerate(ws):
        _check_weight(w, _label(names, i))
    devices = {w.device for w in ws}
    if len(devices) != 1:
        raise ValueError(f"quantize_fp8_blocks: tensors are on {sorted(map(str, devices))}; a bucket must be on "
                         "one device")
    device = devices.pop()
    kind = _pick_backend(backend, device)
    if kind == "torch":
        return [quantize_fp8_block_reference(w, (br, bc), name=None if names is None else names[i])
                for i, w in enumerate(ws)]
    ws = [w.contiguous() for w in ws]
    if kind == "triton":
        from k2sys_triton.fp8_quant import quantize_fp8_blocks_triton

        try:
            return quantize_fp8_blocks_triton(ws, (br, bc), names=list(names) if names is not None else None)
        except ValueError as e:
            raise ValueError(str(e).replace("quantize_fp8_blocks:", "quantize_fp8:", 1)) from None
    return _quantize_cpp(ws, br, bc, threads, names)


def quantize_fp8_block(w: torch.Tensor, block: Sequence[int] = FP8_BLOCK, *, name: str | None = None,
                       threads: int = 0, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One 2-D weight -> (q float8_e4m3fn, scale_inv fp32); see quantize_fp8_blocks."""
    return quantize_fp8_blocks([w], block, names=None if name is None else [name], threads=threads,
                               backend=backend)[0]


def dequantize_fp8_block(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                         block: Sequence[int] = FP8_BLOCK) -> torch.Tensor:
    """w = float32(q) * scale_inv expanded over its blocks, then .to(dtype). Vectorized torch, memory of
    one fp32 copy of q (padded to whole blocks only when the edges are partial)."""
    br, bc = _check_block(block)
    if q.dim() != 2 or q.dtype != FP8_DTYPE:
        raise ValueError(f"dequantize_fp8_block: q must be a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    R, C = q.shape
    nr, nc = fp8_scale_shape((R, C), (br, bc))
    if tuple(scale_inv.shape) != (nr, nc) or scale_inv.dtype != torch.float32:
        raise ValueError(f"dequantize_fp8_block: scale_inv must be float32 of shape {(nr, nc)} for q {(R, C)} "
                         f"and block {(br, bc)}, got {scale_inv.dtype} {tuple(scale_inv.shape)}")
    if scale_inv.device != q.device:
        raise ValueError(f"dequantize_fp8_block: q is on {q.device} but scale_inv on {scale_inv.device}")
    if (q.device.type == "cuda" and triton_available(q.device) and _pow2_block(br) and _pow2_block(bc)
            and dtype in (torch.float32, torch.float16, torch.bfloat16)):
        from k2sys_triton.fp8_quant import dequantize_fp8_block_triton  # one pass, bit-identical

        return dequantize_fp8_block_triton(q, scale_inv, dtype, (br, bc))
    if (nr * br, nc * bc) == (R, C):
        out = q.to(torch.float32)
        out.view(nr, br, nc, bc).mul_(scale_inv[:, None, :, None])
        return out if dtype == torch.float32 else out.to(dtype)
    full = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=q.device)
    full[:R, :C] = q
    full.view(nr, br, nc, bc).mul_(scale_inv[:, None, :, None])
    return full[:R, :C].to(dtype, copy=True) if dtype != torch.float32 else full[:R, :C].contiguous()


# ---------------------------------------------------------------- whole states

def quantize_fp8_state(state: Mapping[str, torch.Tensor], block: Sequence[int] = FP8_BLOCK, *,
                       group_bytes: int = 256 << 20, threads: int = 0) -> dict[str, torch.Tensor]:
    """The release layout of a full-precision HF state: every `is_fp8_weight_name` tensor becomes
    `X.weight` float8 + `X.weight_scale_inv`; others pass through unchanged. Entries already in
    fp8 with their scale_inv are kept as they are. Tensors are quantized in groups of about
    `group_bytes` of input, one quantize_fp8_blocks call per group."""
    out: dict[str, torch.Tensor] = {}
    todo: list[str] = []
    for name, t in state.items():
        if name.endswith(SCALE_SUFFIX):
            w = name[: -len(SCALE_SUFFIX)]
            if w not in state or state[w].dtype != FP8_DTYPE:
                raise ValueError(f"{name}: a block scale without its float8 weight {w!r}; a release checkpoint "
                                 "stores both")
            out[name] = t
        elif not is_fp8_weight_name(name):
            if t.dtype == FP8_DTYPE:
                raise ValueError(f"{name}: float8 tensor where the release format keeps full precision; "
                                 "only attention/MLP linear weights may be fp8")
            out[name] = t
        elif t.dtype == FP8_DTYPE:
            if scale_inv_name(name) not in state:
                raise ValueError(f"{name}: float8 weight without {scale_inv_name(name)!r}; the scales are needed "
                                 "to read it")
            out[name] = t
        else:
            todo.append(name)
    group: list[str] = []
    size = 0

    def flush() -> None:
        nonlocal size
        for n, (q, s) in zip(group, quantize_fp8_blocks([state[n] for n in group], block, names=group,
                                                        threads=threads)):
            out[n], out[scale_inv_name(n)] = q, s
        group.clear()
        size = 0

    for name in todo:
        group.append(name)
        size += state[name].numel() * state[name].element_size()
        if size >= group_bytes:
            flush()
    if group:
        flush()
    return out
