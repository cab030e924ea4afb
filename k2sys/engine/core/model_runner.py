"""The K2 forward pass of the native engine: ragged batches over the paged MLA latent cache.

Weights live in a few fused base tensors (q_a + kv_a input projections, gate+up, stacked
experts); every HF checkpoint name is a *view* into a base, so a weight update is a copy into
the view, and releasing weights frees the bases' storage for real. On CPU in fp32 each linear
also keeps a oneDNN-packed copy of its weight (a cache, refreshed by `load_weights` for the
names it was given and dropped by `release_weights`; the engine defers the refresh off the weight
update's critical path: `load_weights(..., pack="defer")`).

Attention is the absorbed form for every token, prefill and decode:
    q_lat[h] = q_nope[h] @ W_UK[h]            (fold kv_b's K part into the query)
    score    = q_lat . latent + q_rope . k_rope  (over the cached [latent | k_rope] rows)
    out[h]   = (probs @ latent) @ W_UV[h]^T    (apply kv_b's V part after attention)
so K and V are never expanded per head.

Batch-1 decode on CPU in fp32 runs through k2sys's C++ kernels (csrc/gemv.cpp): the one-row linears
(GEMV), the routed experts' GEMV pairs, RMSNorm and the router of small steps, and the absorbed
attention of a lone decode token (`mla_decode_f32`). They equal the torch ops to fp32 rounding
(tests/test_decode_kernels.py); torch's fp32 GEMV reads a third of the memory bandwidth here.
A lone in-order decode token goes further: every layer runs in one C++ call (`decode_layers_f32`,
csrc/decode_layer.h; `_fused_plans`), since ~100 Python-dispatched ops per step cost about as much
as a third of k2-small's weight stream. Where the decoder layers fit in the last-level cache, a
step of up to `fused_max_batch` in-order decode tokens (one per sequence) runs the same stack too,
each token's math exactly batch 1's, layer by layer (`decode_tokens_f32`): small models at small
batches (agentic rollouts, k2-tiny) are dispatch-bound on the per-op path. `fused_decode = False`
keeps the per-op path.

FP8 serving (EngineConfig.quantization="fp8"): every linear weight the DeepSeek-V3 / Kimi-K2
release quantizes (`k2sys.quant.is_fp8_weight_name`) lives in float8_e4m3fn bases with fp32
block-scale bases beside them, under the release names `X.weight` and `X.weight_scale_inv`; the
rest (embeddings, lm_head, norms, router) stays in the compute dtype. A linear dequantizes its
weight when it runs and drops it after (`_Fp8Linear`), so resident memory stays FP8; on CUDA the
routed experts go through the Triton fused MoE, which dequantizes 128x128 tiles in its GEMM loop.

Routed experts elsewhere: "grouped" (the default, `k2sys.engine.core.moe`) runs a layer's experts as two
grouped GEMMs over the stacked expert bases; "loop" is `k2sys.models.moe_experts`, the one torch
reference, one GEMM pair per expert over packed linears (the benchmark's peer, and the FP8 path off
CUDA, which dequantizes one expert at a time).
Only "loop" keeps oneDNN-packed copies of the experts, so "grouped" also halves their memory in fp32.

Shape legend: T tokens in the step, B sequences, Q query tokens per sequence, L cached tokens,
H heads, D hidden, C kv_lora_rank, R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim,
E routed experts, I expert width.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from k2sys.engine.core import packed_layout
from k2sys.engine.core.kv_cache import PagedLatentCache
from k2sys.engine.core.moe import grouped_moe
from k2sys.models import K2Config, moe_experts, param_shapes, route
from k2sys.models.rope import RotaryEmbedding
from k2sys.quant.fp8 import (FP8_BLOCK, FP8_DTYPE, SCALE_SUFFIX, dequantize_fp8_block, fp8_scale_shape,
                             is_fp8_weight_name, quantize_fp8_state, scale_inv_name)

__all__ = ["AttnGroup", "MOE_IMPLS", "ModelRunner", "PromptLogprobSpec", "PromptLogprobs", "StepBatch",
           "QUANTIZATIONS"]

QUANTIZATIONS = ("none", "fp8")
MOE_IMPLS = ("grouped", "loop")

try:  # oneDNN's linear on a weight packed once ahead of time (the op inductor's CPU freezing uses)
    _onednn_linear = torch.ops.mkldnn._linear_pointwise
    _onednn_pack = torch.ops.mkldnn._reorder_linear_weight
except (AttributeError, RuntimeError):  # torch built without oneDNN
    _onednn_linear = _onednn_pack = None

SMALL_ROWS = 64
"""Tokens in a step up to which RMSNorm and the router run as single C++ calls on CPU (decode steps):
their cost there is the torch ops' dispatch, not the math."""

PACK_ROWS = 32
"""Rows oneDNN tunes a packed weight's layout for: about a decode step's tokens per GEMM. Any row
count runs; 32 was fastest or near it from 8 to 1024 rows on k2-small shapes (measured)."""

from k2sys.ext import _C  # the C++ core (None on a broken install: torch's GEMV serves)

try:  # the Triton router + fused MoE (EngineConfig.moe_kernels); CPU keeps k2sys.engine.core.moe
    from k2sys import kernels as _kernels
except Exception:  # noqa: BLE001 - kernels package absent or triton broken: the torch path serves
    _kernels = None


def _triton_moe_enabled(mode: str, device: torch.device) -> bool:
    if _kernels is None:
        if mode == "triton":
            raise ValueError("EngineConfig.moe_kernels=triton: k2sys.kernels does not import "
                             "(`pip install k2sys[kernels]`); use auto or torch")
        return False
    return _kernels.resolve_moe_kernels(mode, device, "EngineConfig.moe_kernels")


@dataclass
class AttnGroup:
    """Sequences that attend with the same query length layout (one padded batch)."""
    rows: torch.Tensor          # [B, Q] rows of the step's tokens (padding rows repeat a valid one)
    qpos: torch.Tensor          # [B, Q] absolute positions of the queries (padding: 0)
    block_tables: torch.Tensor  # [B, nb]
    ctx_len: torch.Tensor       # [B] tokens in cache after this step's writes
    valid: torch.Tensor         # [B, Q] real query (not padding)


@dataclass
class PromptLogprobSpec:
    """Prompt positions of this step whose next-token log-probabilities are wanted (echo /
    input_token_logprobs), computed from the same forward as the step's sampling logits."""
    rows: torch.Tensor          # [P] rows of the step's tokens
    targets: torch.Tensor       # [P] the prompt token that follows each row
    top_k: int = 0              # also the k most likely tokens of each row
    token_ids: torch.Tensor | None = None  # [U] also the log-probs of these tokens at each row


@dataclass
class PromptLogprobs:
    target: torch.Tensor                    # [P] log p(target | prefix)
    top_values: torch.Tensor | None = None  # [P, k], descending
    top_ids: torch.Tensor | None = None     # [P, k]
    token_ids: torch.Tensor | None = None   # [P, U] log-probs of spec.token_ids


PAD_WASTE = 1.25
"""A CPU prefill group attends sequence by sequence once padding would add more than this factor of work."""

FUSED_MAX_BATCH = 32
"""The most in-order decode tokens a step runs through the fused C++ stack (ModelRunner.fused_max_batch)."""


def last_level_cache_bytes(default: int = 8 << 20) -> int:
    """The largest CPU cache of cpu0 (sysfs), or `default` where the kernel does not say."""
    best = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(root)
    except OSError:
        return default
    for e in entries:
        try:
            with open(os.path.join(root, e, "size")) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in "KMG" else text
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best or default


@dataclass
class StepBatch:
    input_ids: torch.Tensor     # [T]
    positions: torch.Tensor     # [T]
    slots: torch.Tensor         # [T] cache slot of each token
    groups: list[AttnGroup]
    logit_rows: torch.Tensor    # [S] rows whose next-token logits are needed
    prompt_logprobs: PromptLogprobSpec | None = None


class _Linear:
    """y = x @ w.T (+ bias) for a weight [out, in] that lives in a base tensor.

    On CPU in fp32 it also keeps a oneDNN-packed copy of w: MKL re-packs the weight inside every
    GEMM, which dominates the few-row GEMMs of decode; packing once makes them 1.1-1.7x faster
    and the 16k-vocab lm_head 1.6-2.4x (k2-small shapes, 1-32 rows, measured). The copy is a
    cache: `pack()` refreshes it after the weight changes, `unpack()` frees it, `invalidate()`
    marks it stale and packs again on the first call that uses it (or when the runner's
    `pack_pending` gets to it first); until then the plain GEMM serves the current weight.

    Where k2sys.engine.core.packed_layout knows the layout oneDNN chose for this shape, a refresh
    rewrites the existing packed buffer in place with the C++ packer (~2-3x faster than oneDNN's
    reorder into a new tensor); a stale copy is kept for that, never read. `park()` keeps the
    copy's memory through a weight release (colocated CPU runs, ModelRunner.release_weights).
    """

    __slots__ = ("w", "bias", "packed", "pending", "gemv", "layout", "parked")

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None = None):
        self.w, self.bias, self.packed, self.pending, self.parked = w, bias, None, False, False
        self.layout = None  # packed_layout.BlockedLayout once probed; False: oneDNN's reorder only
        # One row on CPU in fp32: k2sys's C++ GEMV (csrc/gemv.h) streams the weight at ~1.5-3x the
        # read bandwidth of torch's GEMV, which neither beats a plain read nor scales with threads
        # (k2-small shapes, 1 and 2 threads, measured); decode at batch 1 is these GEMVs.
        self.gemv = (_C is not None and w.device.type == "cpu" and w.dtype == torch.float32 and w.dim() == 2
                     and w.stride(1) == 1 and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:
            if self.pending:
                self.pack()
            if self.packed is not None:
                return _onednn_linear(x, self.packed, self.bias, "none", [], "")
        elif x.shape[0] == 1 and self.gemv and x.dtype == torch.float32 and x.is_contiguous():
            w, n = self.w, self.w.shape[0]
            y = torch.empty(1, n)
            _C.gemv_f32_ptr(y.data_ptr(), w.data_ptr(), x.data_ptr(), 0 if self.bias is None else self.bias.data_ptr(),
                            n, w.shape[1], w.stride(0), torch.get_num_threads())
            return y
        # One row otherwise: the plain GEMV is faster than the packed call, by ~25% through a small
        # weight and by 5-30% through the 16k-vocab lm_head (k2-small, 1 and 2 threads, measured).
        return F.linear(x, self.w, self.bias)

    def pack(self) -> None:
        if self.layout is None:
            lay = packed_layout.layout_for(*self.w.shape, PACK_ROWS) if self.gemv else None
            self.layout = lay if lay is not None else False
        if self.packed is not None and self.layout:
            packed_layout.repack_(self.packed, self.w, self.layout, torch.get_num_threads())
        else:
            self.packed = _onednn_pack(self.w.contiguous(), PACK_ROWS)
        self.pending = self.parked = False

    def unpack(self) -> None:
        self.packed, self.pending, self.parked = None, False, False

    def invalidate(self) -> None:
        if not self.layout:  # no in-place refresh for this shape: free the stale copy now
            self.packed = None
        self.pending = True

    def park(self) -> None:
        """Weights released: keep the packed copy's memory (stale) for an in-place refresh after the
        next update, where one is possible; else free it."""
        if self.packed is not None and self.layout:
            self.pending = self.parked = True
        else:
            self.unpack()


class _Fp8Linear:
    """y = x @ dequant(q).T (+ bias) for an FP8 weight [out, in] with block scales.

    `q` may fuse several HF weights stacked along the rows (q_a + kv_a, gate + up); each keeps its
    own scale_inv (the release layout), so `parts` lists (rows, scale_inv view) in order. When every
    part but the last fills whole row blocks, the stacked scales are the fused weight's own block
    scales and it dequantizes in one call. The dequantized weight lives only for the call.
    """

    __slots__ = ("q", "parts", "bias", "dtype", "block", "whole_scale", "packed", "pending")

    def __init__(self, q: torch.Tensor, parts: list[tuple[int, torch.Tensor]], dtype: torch.dtype,
                 block: tuple[int, int], bias: torch.Tensor | None = None, whole_scale: torch.Tensor | None = None):
        self.q, self.parts, self.dtype, self.block, self.bias = q, parts, dtype, block, bias
        self.whole_scale = whole_scale if all(r % block[0] == 0 for r, _ in parts[:-1]) else None
        self.packed, self.pending = None, False

    def weight(self) -> torch.Tensor:
        if self.whole_scale is not None:
            return dequantize_fp8_block(self.q, self.whole_scale, self.dtype, self.block)
        out = torch.empty(self.q.shape, dtype=self.dtype, device=self.q.device)
        r0 = 0
        for rows, scale in self.parts:
            out[r0:r0 + rows] = dequantize_fp8_block(self.q[r0:r0 + rows], scale, self.dtype, self.block)
            r0 += rows
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def pack(self) -> None:  # nothing cached: the FP8 bytes are the only resident copy
        pass

    def unpack(self) -> None:
        pass

    def invalidate(self) -> None:
        pass

    def park(self) -> None:
        pass


def _packing_works(device: torch.device, dtype: torch.dtype) -> bool:
    """True where packed oneDNN linears run and agree with F.linear (CPU, fp32)."""
    if _onednn_linear is None or device.type != "cpu" or dtype != torch.float32:
        return False
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w, x, b = (torch.randn(*s, generator=g) for s in ((48, 40), (5, 40), (48,)))
        lin = _Linear(w, b)
        lin.pack()
        return bool(torch.allclose(lin(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5))
    except RuntimeError:
        return False


class _Layer:
    """One decoder layer's weights as fused bases and HF-named views (filled by ModelRunner)."""


def _fp8_block(cfg: K2Config) -> tuple[int, int]:
    """The checkpoint's weight_block_size when it was released in FP8, else 128 x 128."""
    qc = getattr(cfg, "quantization_config", None) or {}
    bs = qc.get("weight_block_size") if isinstance(qc, dict) else None
    return (int(bs[0]), int(bs[1])) if bs else FP8_BLOCK


class ModelRunner:
    def __init__(self, cfg: K2Config, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: str | torch.device = "cpu", max_positions: int | None = None, moe_kernels: str = "auto",
                 quantization: str = "none", moe_impl: str = "grouped"):
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"EngineConfig.quantization: use one of {QUANTIZATIONS}, got {quantization!r}")
        if moe_impl not in MOE_IMPLS:
            raise ValueError(f"ModelRunner moe_impl: use one of {MOE_IMPLS}, got {moe_impl!r}")
        self.moe_impl = moe_impl
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.fp8 = quantization == "fp8"
        self.fp8_block = _fp8_block(cfg) if self.fp8 else None
        self.triton_moe = _triton_moe_enabled(moe_kernels, self.device)
        self.H, self.C, self.R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.N, self.V = cfg.qk_nope_head_dim, cfg.v_head_dim
        self.scale = cfg.softmax_scale
        self.bases: list[torch.Tensor] = []
        self.params: dict[str, torch.Tensor] = {}
        self.linears: list[_Linear | _Fp8Linear] = []
        self._consumers: dict[str, _Linear | _Fp8Linear] = {}   # HF name -> the linear whose packed copy it feeds
        self._expert_linears: set[int] = set()  # ids of the per-expert linears (packed only for moe_impl="loop")
        self._pending: dict[int, _Linear] = {}  # id -> invalidated linear pack_pending() packs (any packed on use: skipped)
        self.packed = _packing_works(self.device, dtype)
        self._build_storage()
        self.expected = {n: tuple(s) for n, s in param_shapes(cfg).items()}
        if self.fp8:
            for n, shape in list(self.expected.items()):
                if is_fp8_weight_name(n):
                    self.expected[scale_inv_name(n)] = fp8_scale_shape(shape, self.fp8_block)
            state = self._fp8_state(state)
        else:
            scales = sorted(n for n in state if n.endswith(SCALE_SUFFIX))
            if scales:
                raise ValueError(f"weights hold FP8 block scales ({scales[:2]}, ...): serve them in FP8 with "
                                 "quantization='fp8' (EngineConfig.quantization, `k2sys serve --quantization fp8`) "
                                 "or load the checkpoint dequantized")
        missing = sorted(set(self.expected) - set(state))
        unexpected = sorted(set(state) - set(self.expected))
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        self.load_weights(state)
        self.rope = RotaryEmbedding(cfg).to(self.device)
        n_pos = max_positions or cfg.max_position_embeddings
        cos, sin = self.rope.cos_sin(torch.arange(n_pos, device=self.device), dtype)
        self.cos_table, self.sin_table = cos, sin
        # Decode through csrc/decode_layer.h (every layer in one C++ call) where it applies;
        # False keeps the per-op path (tests and benchmarks compare the two).
        self.fused_decode = True
        self.fused_max_batch = self._fused_batch_limit()
        """Decode steps of up to this many in-order tokens run the fused stack too, token after token
        layer by layer (csrc/decode_layer.h decode_tokens_f32): FUSED_MAX_BATCH where the decoder
        layers' weights fit in half the last-level cache (re-read per token from cache, the tokens
        cost little more than batch 1 each, while the per-op path pays ~100 Python dispatches a
        step: k2-tiny 2.6-5x faster at 2-8 tokens, 1.1x at 32), else 1 (k2-small's 220 MB are
        re-read from memory per token: the per-op path's GEMMs win from 4 tokens on). Measured on
        the 2-core dev VM (32 MB L3); set it to tune."""
        self._plan_key: tuple | None = None
        self._plans: list | None = None

    def _fused_batch_limit(self) -> int:
        if self.device.type != "cpu":
            return 1
        stack = sum(t.numel() * t.element_size() for n, t in self.params.items() if ".layers." in n)
        return FUSED_MAX_BATCH if stack <= last_level_cache_bytes() // 2 else 1

    def _fp8_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The release layout of `state`: FP8 entries with their scales are kept as they are,
        full-precision linear weights are quantized (one quantize_fp8_blocks call per group), and a
        tensor stored in FP8 that the engine keeps in full precision is dequantized exactly."""
        state = dict(state)
        for name in [n for n, t in state.items() if t.dtype == FP8_DTYPE and not is_fp8_weight_name(n)]:
            scale = state.pop(name + SCALE_SUFFIX, None)
            if scale is None:
                raise ValueError(f"{name}: float8 tensor without {name + SCALE_SUFFIX!r}; the scales are needed "
                                 "to read it")
            state[name] = dequantize_fp8_block(state[name], scale.to(torch.float32), torch.float32, self.fp8_block)
        return quantize_fp8_state(state, self.fp8_block)

    # ---- weight storage ----------------------------------------------------------------------
    def _base(self, *shape: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.zeros(*shape, dtype=dtype or self.dtype, device=self.device)
        self.bases.append(t)
        return t

    def _weights(self, names: list[str], rows: list[int], cols: int,
                 count: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Storage for linear weights stacked along the rows: one base [sum(rows), cols] (with
        `count`: [count, sum(rows), cols], names holding "{e}") and each HF name a view of it. In
        FP8 mode the base is float8 and an fp32 base beside it holds every name's weight_scale_inv
        (its row blocks stacked the same way). Returns (base, scale base or None)."""
        lead = () if count is None else (count,)
        base = self._base(*lead, sum(rows), cols, dtype=FP8_DTYPE if self.fp8 else None)
        sbase, srows = None, [0] * len(rows)
        if self.fp8:
            srows = [fp8_scale_shape((r, cols), self.fp8_block)[0] for r in rows]
            sbase = self._base(*lead, sum(srows), fp8_scale_shape((1, cols), self.fp8_block)[1], dtype=torch.float32)
        for k in range(count or 1):
            b = base if count is None else base[k]
            sb = sbase if count is None or sbase is None else sbase[k]
            r0 = s0 = 0
            for name, r, sr in zip(names, rows, srows):
                n = name if count is None else name.format(e=k)
                self.params[n] = b[r0:r0 + r]
                if self.fp8:
                    if not is_fp8_weight_name(n):  # the storage plan and the release rule must agree
                        raise AssertionError(f"{n} is stored in FP8 but the release keeps it in full precision")
                    self.params[scale_inv_name(n)] = sb[s0:s0 + sr]
                r0, s0 = r0 + r, s0 + sr
        return base, sbase

    def _linear(self, w: torch.Tensor, names: list[str], bias: torch.Tensor | None = None,
                scale: torch.Tensor | None = None, rows: list[int] | None = None) -> _Linear | _Fp8Linear:
        """The linear of weight `w` (FP8 when `scale`, the block scales of its stacked `rows`)."""
        if scale is None:
            lin = _Linear(w, bias)
        else:
            parts, s0 = [], 0
            for r in rows or [w.shape[0]]:
                sr = fp8_scale_shape((r, w.shape[1]), self.fp8_block)[0]
                parts.append((r, scale[s0:s0 + sr]))
                s0 += sr
            lin = _Fp8Linear(w, parts, self.dtype, self.fp8_block, bias, whole_scale=scale)
            names = names + [scale_inv_name(n) for n in names if n.endswith(".weight")]
        self.linears.append(lin)
        for n in names:
            self._consumers[n] = lin
        return lin

    def _build_storage(self) -> None:
        cfg, H, C, R, N, V = self.cfg, self.H, self.C, self.R, self.N, self.V
        D, P = cfg.hidden_size, self.params
        self.embed = P["model.embed_tokens.weight"] = self._base(cfg.vocab_size, D)
        if cfg.tie_word_embeddings:
            self.lm_head = self._linear(self.embed, ["model.embed_tokens.weight"])
        else:
            P["lm_head.weight"] = self._base(cfg.vocab_size, D)
            self.lm_head = self._linear(P["lm_head.weight"], ["lm_head.weight"])
        self.final_norm = P["model.norm.weight"] = self._base(D)
        self.layers: list[_Layer] = []
        qk = H * (N + R)
        for i in range(cfg.num_hidden_layers):
            p, L = f"model.layers.{i}.", _Layer()
            self.layers.append(L)
            a = p + "self_attn."
            L.in_norm = P[p + "input_layernorm.weight"] = self._base(D)
            L.post_norm = P[p + "post_attention_layernorm.weight"] = self._base(D)
            # One matmul for both input projections of attention (q_a or q, and kv_a).
            L.q_in = cfg.q_lora_rank if cfg.q_lora_rank is not None else qk
            q_name = a + ("q_a_proj" if cfg.q_lora_rank else "q_proj")
            names = [q_name + ".weight", a + "kv_a_proj_with_mqa.weight"]
            rows = [L.q_in, C + R]
            attn_in, attn_in_scale = self._weights(names, rows, D)
            attn_in_bias = None
            if cfg.attention_bias:
                attn_in_bias = self._base(L.q_in + C + R)
                if cfg.q_lora_rank:
                    P[a + "q_a_proj.bias"] = attn_in_bias[:L.q_in]
                P[a + "kv_a_proj_with_mqa.bias"] = attn_in_bias[L.q_in:]
                names = names + [a + "q_a_proj.bias", a + "kv_a_proj_with_mqa.bias"]
            L.attn_in = self._linear(attn_in, names, attn_in_bias, attn_in_scale, rows)
            if cfg.q_lora_rank:
                L.q_norm = P[a + "q_a_layernorm.weight"] = self._base(cfg.q_lora_rank)
                q_b, q_b_scale = self._weights([a + "q_b_proj.weight"], [qk], cfg.q_lora_rank)
                L.q_b = self._linear(q_b, [a + "q_b_proj.weight"], scale=q_b_scale)
            L.kv_norm = P[a + "kv_a_layernorm.weight"] = self._base(C)
            L.kv_b, kv_b_scale = self._weights([a + "kv_b_proj.weight"], [H * (N + V)], C)
            L.kv_b_fp8 = None
            if kv_b_scale is None:
                kvb = L.kv_b.view(H, N + V, C)
                L.w_uk, L.w_uv = kvb[:, :N], kvb[:, N:]          # [H, N, C], [H, V, C]
            else:  # dequantized per step (_kv_b)
                L.kv_b_fp8 = self._linear(L.kv_b, [a + "kv_b_proj.weight"], scale=kv_b_scale)
            o_proj, o_scale = self._weights([a + "o_proj.weight"], [D], H * V)
            o_bias = None
            if cfg.attention_bias:
                o_bias = P[a + "o_proj.bias"] = self._base(D)
            L.o_proj = self._linear(o_proj, [a + "o_proj.weight", a + "o_proj.bias"], o_bias, o_scale)
            L.moe = cfg.is_moe_layer(i)
            if not L.moe:
                L.gate_up, L.down = self._mlp(p + "mlp.", cfg.intermediate_size)
                continue
            E, I = cfg.n_routed_experts, cfg.moe_intermediate_size
            L.router = P[p + "mlp.gate.weight"] = self._base(E, D, dtype=torch.float32)
            L.router_bias = P[p + "mlp.gate.e_score_correction_bias"] = self._base(E, dtype=torch.float32)
            q = p + "mlp.experts.{e}."
            L.w13, L.s13 = self._weights([q + "gate_proj.weight", q + "up_proj.weight"], [I, I], D, count=E)
            L.w2, L.s2 = self._weights([q + "down_proj.weight"], [D], I, count=E)
            # The Triton fused MoE reads FP8 experts with 128x128 scales over the fused gate|up rows:
            # the per-name scales stack into exactly those when I fills whole blocks.
            L.fused_ok = not self.fp8 or (self.fp8_block == (128, 128) and I % 128 == 0
                                          and self.dtype in (torch.bfloat16, torch.float16))
            L.experts13, L.experts2 = [], []
            for e in range(E):
                qe = q.format(e=e)
                L.experts13.append(self._linear(L.w13[e], [qe + "gate_proj.weight", qe + "up_proj.weight"],
                                                scale=None if L.s13 is None else L.s13[e], rows=[I, I]))
                L.experts2.append(self._linear(L.w2[e], [qe + "down_proj.weight"],
                                               scale=None if L.s2 is None else L.s2[e]))
            self._expert_linears.update(map(id, L.experts13 + L.experts2))
            L.shared = None
            if cfg.n_shared_experts:
                L.shared = self._mlp(p + "mlp.shared_experts.", I * cfg.n_shared_experts)

    def _mlp(self, prefix: str, inter: int) -> tuple[_Linear | _Fp8Linear, _Linear | _Fp8Linear]:
        g, u, d = (prefix + n + "_proj.weight" for n in ("gate", "up", "down"))
        gate_up, gate_up_scale = self._weights([g, u], [inter, inter], self.cfg.hidden_size)
        down, down_scale = self._weights([d], [self.cfg.hidden_size], inter)
        return (self._linear(gate_up, [g, u], scale=gate_up_scale, rows=[inter, inter]),
                self._linear(down, [d], scale=down_scale))

    @property
    def weight_bytes(self) -> int:
        """Resident weight bytes: the bases and the packed copies (call pack_pending() first for the
        footprint with every deferred copy built)."""
        return sum(b.untyped_storage().nbytes() for b in self.bases) + self._packed_bytes(parked=False)

    @property
    def parked_bytes(self) -> int:
        """Bytes of packed copies kept through a weight release (release_weights(keep_packed=True))."""
        return self._packed_bytes(parked=True)

    def _packed_bytes(self, parked: bool) -> int:
        return sum(lin.packed.numel() * lin.packed.element_size() for lin in self.linears
                   if lin.packed is not None and getattr(lin, "parked", False) == parked)

    def load_weights(self, named: dict[str, torch.Tensor], pack: str = "now") -> None:
        """Copy HF-named tensors into their views, then refresh the packed copies they feed: now
        (pack="now"), or pack="defer": drop them (the plain GEMM serves the new weights) and rebuild
        each on its first multi-row call or in pack_pending(), whichever comes first. The engine
        defers: re-packing k2-small's 73 MB of fp32 linears took ~0.04-0.05 s of every switch.

        Shapes must match exactly; FP8 weights and their scales are copied only from tensors of the
        same dtype (a cast into float8 storage would drop the scales). Nothing is copied unless every
        tensor passes."""
        if pack not in ("now", "defer"):
            raise ValueError(f"load_weights pack: use 'now' or 'defer', got {pack!r}")
        for name, t in named.items():
            dst = self.params[name]
            if tuple(t.shape) != tuple(dst.shape):
                raise ValueError(f"weights[{name!r}]: shape {tuple(t.shape)} does not match the model's "
                                 f"{tuple(dst.shape)}")
            if (dst.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX)) and t.dtype != dst.dtype:
                raise ValueError(f"weights[{name!r}]: {t.dtype} into the engine's {dst.dtype} FP8 storage; quantize "
                                 "full-precision weights with k2sys.quant.quantize_fp8_blocks (weight + scale_inv)")
        with torch.no_grad():
            for name, t in named.items():
                self.params[name].copy_(t)
        if self.packed:
            for lin in {id(c): c for n in named if (c := self._consumers.get(n)) is not None}.values():
                if not self._keeps_packed(lin):
                    continue
                if pack == "now":
                    lin.pack()
                else:
                    lin.invalidate()
                    self._pending[id(lin)] = lin

    @property
    def packs_pending(self) -> bool:
        """Whether deferred packed copies are left for pack_pending() to build."""
        return bool(self._pending)

    def pack_pending(self, limit: int | None = None) -> None:
        """Build up to `limit` (None: all) of the packed copies load_weights(pack="defer") left."""
        n = 0
        while self._pending and (limit is None or n < limit):
            _, lin = self._pending.popitem()
            if lin.pending:  # else packed on use meanwhile, or dropped by unpack()
                lin.pack()
                n += 1

    def _keeps_packed(self, lin: _Linear | _Fp8Linear) -> bool:
        return self.moe_impl == "loop" or id(lin) not in self._expert_linears

    def set_moe_impl(self, impl: str) -> None:
        """Switch the routed experts between "grouped" and "loop" (MOE_IMPLS), packing or freeing the
        experts' oneDNN copies to match (while the weights are released, the next update packs)."""
        if impl not in MOE_IMPLS:
            raise ValueError(f"ModelRunner moe_impl: use one of {MOE_IMPLS}, got {impl!r}")
        self.moe_impl = impl
        if not self.packed:
            return
        resident = all(b.untyped_storage().nbytes() or not b.numel() for b in self.bases)
        for L in self.layers:
            for lin in getattr(L, "experts13", []) + getattr(L, "experts2", []):
                if resident and self._keeps_packed(lin):
                    lin.pack()
                else:
                    lin.unpack()

    def release_weights(self, keep_packed: bool = False) -> None:
        """Free every base's storage (views stay attached to the emptied storage) and the packed
        copies; keep_packed=True keeps the packed copies that can be refreshed in place (stale until
        the next update rewrites them: `parked_bytes`), the rest are freed."""
        for lin in self.linears:
            if keep_packed:
                lin.park()
            else:
                lin.unpack()
        self._pending.clear()
        for b in self.bases:
            b.untyped_storage().resize_(0)

    def resume_weights(self) -> None:
        """Storage back, contents undefined until the next weight update (which repacks)."""
        for b in self.bases:
            b.untyped_storage().resize_(b.numel() * b.element_size())

    # ---- forward -----------------------------------------------------------------------------
    @staticmethod
    def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float32:
            if (_C is not None and x.device.type == "cpu" and x.shape[0] <= SMALL_ROWS and x.dim() == 2
                    and x.stride(1) == 1 and w.dtype == torch.float32 and w.stride(0) == 1):
                # decode: one C++ pass instead of F.rms_norm's 6 ops on CPU
                y = torch.empty(x.shape)
                _C.rms_norm_f32_ptr(y.data_ptr(), x.data_ptr(), w.data_ptr(), x.shape[0], x.shape[1], x.stride(0), eps)
                return y
            return F.rms_norm(x, (x.shape[-1],), w, eps)  # bit-equal to the formula below in fp32 (measured)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return w * xf.to(x.dtype)

    def _rope_qk(self, q_rope: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate the queries' rope parts [T, H, R] and the shared rope key [T, R] in one pass (the
        key rides as head H; RoPE is elementwise, so this equals rotating each on its own)."""
        r = self.rope.apply(torch.cat([q_rope, k_rope[:, None]], dim=1), cos, sin)
        return r[:, :self.H], r[:, self.H]

    def forward(self, batch: StepBatch, cache: PagedLatentCache) -> torch.Tensor:
        """-> logits [S, vocab] (fp32) for batch.logit_rows."""
        return self.forward_with_prompt_logprobs(batch, cache)[0]

    @torch.inference_mode()
    def forward_with_prompt_logprobs(self, batch: StepBatch,
                                     cache: PagedLatentCache) -> tuple[torch.Tensor, PromptLogprobs | None]:
        """-> (logits [S, vocab] fp32 for batch.logit_rows, the prompt log-probs batch.prompt_logprobs asks for)."""
        cfg = self.cfg
        eps = cfg.rms_norm_eps
        x = F.embedding(batch.input_ids, self.embed)
        T = x.shape[0]
        plans = self._fused_plans(batch, cache) if self.fused_decode and T <= self.fused_max_batch else None
        if plans is not None and T == 1:  # a lone in-order decode token: every layer in one C++ call, in place on x
            g, pos = batch.groups[0], int(batch.positions[0])
            blocks = g.block_tables[0].contiguous()
            _C.decode_layers_f32_ptr(plans, x.data_ptr(), self.cos_table[pos].data_ptr(), self.sin_table[pos].data_ptr(),
                                     int(batch.slots[0]), blocks.data_ptr(), cache.block_size, int(g.ctx_len[0]),
                                     torch.get_num_threads())
        elif plans is not None:  # T in-order decode tokens of T sequences: the same stack, layer by layer
            g = batch.groups[0]
            pos, slots = batch.positions.contiguous(), batch.slots.contiguous()
            blocks, ctx = g.block_tables.contiguous(), g.ctx_len.contiguous()
            _C.decode_tokens_f32_ptr(plans, x.data_ptr(), T, x.stride(0), self.cos_table.data_ptr(),
                                     self.sin_table.data_ptr(), self.cos_table.stride(0), pos.data_ptr(),
                                     slots.data_ptr(), blocks.data_ptr(), blocks.stride(0), cache.block_size,
                                     ctx.data_ptr(), torch.get_num_threads())
        else:
            # [T, 1, R/2]: broadcast over the query heads and the rope key (see _rope_qk)
            cos, sin = self.cos_table[batch.positions][:, None], self.sin_table[batch.positions][:, None]
            # The causal + length mask is the same in every layer: build it once per step.
            groups = [(g, self._seq_plan(g, cache.block_size, x.dtype) or self._attn_bias(g, cache.block_size, x.dtype),
                       self._in_order(batch, g, x.shape[0])) for g in batch.groups]
            for li, L in enumerate(self.layers):
                h = self._rms(x, L.in_norm, eps)
                x = x + self._attention(li, L, h, cos, sin, batch, cache, groups)
                h = self._rms(x, L.post_norm, eps)
                x = x + (self._moe(L, h) if L.moe else self._swiglu(h, L.gate_up, L.down))
        spec = batch.prompt_logprobs
        prompt = None
        if spec is not None and spec.rows.numel():
            prompt = self._prompt_logprobs(self._rms(x.index_select(0, spec.rows), self.final_norm, eps), spec)
        if batch.logit_rows.numel() != x.shape[0]:  # prefill chunks: only their last rows need logits
            x = x.index_select(0, batch.logit_rows)
        x = self._rms(x, self.final_norm, eps)
        return self.lm_head(x).float(), prompt

    def _fused_plans(self, batch: StepBatch, cache: PagedLatentCache) -> list | None:
        """The per-layer plans of the C++ decode stack (csrc/decode_layer.h) for this one-token step, or
        None where it does not apply: not fp32 on the CPU, FP8, the Triton MoE, moe_impl="loop", a weight
        or cache not laid out as the kernels read it, or a step that is not one in-order decode token.
        Plans hold addresses: they are rebuilt whenever a weight base or a cache layer moved (released
        and resumed storage)."""
        if (_C is None or not hasattr(_C, "decode_layers_f32_ptr") or self.device.type != "cpu"
                or self.dtype != torch.float32 or self.fp8 or self.triton_moe or self.moe_impl != "grouped"):
            return None
        if len(batch.groups) != 1 or batch.prompt_logprobs is not None and batch.prompt_logprobs.rows.numel():
            return None
        g, T = batch.groups[0], batch.input_ids.shape[0]
        if g.block_tables.dtype != torch.int64 or cache.dtype != torch.float32:
            return None
        if T == 1:
            if g.rows.shape != (1, 1) or int(g.rows[0, 0]) != 0 or int(batch.positions[0]) >= self.cos_table.shape[0]:
                return None
        elif (not self._in_order(batch, g, T) or not bool(g.valid.all())
              or int(batch.positions.max()) >= self.cos_table.shape[0]
              or batch.positions.dtype != torch.int64 or batch.slots.dtype != torch.int64
              or g.ctx_len.dtype != torch.int64):
            return None
        key = (id(cache), tuple(b.data_ptr() for b in self.bases), tuple(t.data_ptr() for t in cache.layers))
        if key != self._plan_key:
            self._plans, self._plan_key = self._build_plans(cache), key
        return self._plans

    def _build_plans(self, cache: PagedLatentCache) -> list | None:
        cfg, D = self.cfg, self.cfg.hidden_size
        if not (self.cos_table.is_contiguous() and self.sin_table.is_contiguous()
                and self.cos_table.dtype == torch.float32 and self.cos_table.shape[-1] * 2 == self.R):
            return None

        def rows(lin) -> int:  # a plain fp32 linear with contiguous rows: its weight's address, else 0
            if not isinstance(lin, _Linear):
                return 0
            w = lin.w
            if (w.dtype != torch.float32 or w.dim() != 2 or w.stride(1) != 1 or w.stride(0) != w.shape[1]
                    or lin.bias is not None and not lin.bias.is_contiguous()):
                return 0
            return w.data_ptr()

        def ptr(t: torch.Tensor | None) -> int:
            return 0 if t is None else t.data_ptr()

        plans = []
        for li, L in enumerate(self.layers):
            P = _C.DecodeLayer()
            P.D, P.H, P.N, P.R, P.C, P.V, P.q_in = D, self.H, self.N, self.R, self.C, self.V, L.q_in
            P.q_lora, P.interleave = bool(cfg.q_lora_rank), bool(self.rope.interleave)
            P.eps, P.q_eps, P.kv_eps, P.scale = cfg.rms_norm_eps, 1e-6, 1e-6, self.scale
            P.in_norm, P.post_norm, P.kv_norm = ptr(L.in_norm), ptr(L.post_norm), ptr(L.kv_norm)
            P.attn_in, P.attn_in_bias = rows(L.attn_in), ptr(L.attn_in.bias)
            P.o_proj, P.o_bias = rows(L.o_proj), ptr(L.o_proj.bias)
            need = [P.attn_in, P.o_proj]
            if cfg.q_lora_rank:
                P.q_norm, P.q_b = ptr(L.q_norm), rows(L.q_b)
                need.append(P.q_b)
            w_uk, w_uv = L.w_uk, L.w_uv
            if (w_uk.stride(2) != 1 or w_uk.stride(1) != self.C or w_uv.stride(2) != 1 or w_uv.stride(1) != self.C):
                return None
            P.w_uk, P.w_uv, P.uk_stride, P.uv_stride = ptr(w_uk), ptr(w_uv), w_uk.stride(0), w_uv.stride(0)
            kvc = cache.layers[li]
            if not kvc.is_contiguous() or kvc.shape[-1] != self.C + self.R:
                return None
            P.cache, P.num_blocks = kvc.data_ptr(), kvc.shape[0]
            P.moe = bool(L.moe)
            mlp = (L.gate_up, L.down) if not L.moe else L.shared
            if mlp is not None:
                P.gate_up, P.down, P.inter = rows(mlp[0]), rows(mlp[1]), mlp[1].w.shape[1]
                need += [P.gate_up, P.down]
                if mlp[0].bias is not None or mlp[1].bias is not None:
                    return None
            if L.moe:
                w13, w2 = L.w13, L.w2
                if (w13.stride(2) != 1 or w13.stride(1) != D or w2.stride(2) != 1 or w2.stride(1) != w2.shape[2]
                        or not L.router.is_contiguous() or not L.router_bias.is_contiguous()):
                    return None
                P.router, P.router_bias, P.w13, P.w2 = ptr(L.router), ptr(L.router_bias), ptr(w13), ptr(w2)
                P.E, P.I, P.stride13, P.stride2 = w13.shape[0], w2.shape[2], w13.stride(0), w2.stride(0)
                P.top_k, P.n_group, P.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
                P.routed_scale, P.norm_topk = cfg.routed_scaling_factor, bool(cfg.norm_topk_prob)
            if not all(need):
                return None
            plans.append(P)
        return plans

    PROMPT_LOGPROB_ELEMENTS = 1 << 24
    """Logits held at once while reducing prompt rows to log-probs (64 MiB of fp32)."""

    def _prompt_logprobs(self, h: torch.Tensor, spec: PromptLogprobSpec) -> PromptLogprobs:
        """log_softmax over the vocabulary for each row of h, a chunk of rows at a time, reduced to
        what was asked: the target's log-prob, the top k, the listed token ids."""
        V = self.cfg.vocab_size
        chunk = max(1, self.PROMPT_LOGPROB_ELEMENTS // V)
        target, top_v, top_i, ids = [], [], [], []
        for i in range(0, h.shape[0], chunk):
            lp = self.lm_head(h[i:i + chunk]).float().log_softmax(-1)
            target.append(lp.gather(1, spec.targets[i:i + chunk, None])[:, 0])
            if spec.top_k > 0:
                v, j = lp.topk(min(spec.top_k, V), dim=-1)
                top_v.append(v)
                top_i.append(j)
            if spec.token_ids is not None:
                ids.append(lp.index_select(1, spec.token_ids))
        return PromptLogprobs(target=torch.cat(target), top_values=torch.cat(top_v) if top_v else None,
                              top_ids=torch.cat(top_i) if top_i else None, token_ids=torch.cat(ids) if ids else None)

    def _seq_plan(self, g: AttnGroup, block_size: int, dtype: torch.dtype) -> list | None:
        """For a prefill group on the CPU whose padding would cost more than PAD_WASTE of its real
        attention work, one entry per sequence: (first row, queries, context, its blocks, its mask
        [n*H, ctx]); None keeps the padded batch. A padded group scores every query against every
        key slot of the longest context (B x Q x L): sequences prefilling turns of different lengths
        over contexts of different lengths (agentic rollouts: tool results appended to each
        conversation) wasted up to 60% of the step on padding, while a loop of exact-size GEMMs adds
        a few ops per sequence and layer."""
        B, Q = g.rows.shape
        if Q == 1 or B == 1 or g.rows.device.type != "cpu":
            return None
        n = g.valid.sum(1).tolist()
        ctx = g.ctx_len.tolist()
        L = g.block_tables.shape[1] * block_size
        if B * Q * L <= PAD_WASTE * sum(a * c for a, c in zip(n, ctx)):
            return None
        # the layout the scheduler builds, which the loop relies on: a sequence's valid queries lead
        # its row, sit on consecutive step rows and are its last n positions before ctx_len
        i = torch.arange(Q, device=g.rows.device)
        nn, cc = g.valid.sum(1, keepdim=True), g.ctx_len[:, None]
        if not (torch.equal(g.valid, i[None, :] < nn)
                and torch.equal(g.rows, g.rows[:, :1] + torch.minimum(i[None, :], nn - 1))
                and torch.equal(torch.where(g.valid, g.qpos, 0), torch.where(g.valid, cc - nn + i[None, :], 0))):
            return None
        plan = []
        for b in range(B):
            nb, c, q0 = -(-ctx[b] // block_size), ctx[b], ctx[b] - n[b]
            # query i (position q0 + i) sees keys 0 .. q0 + i: the prefix, then a causal triangle
            k = torch.arange(c)
            keep = k[None, :] <= (q0 + torch.arange(n[b]))[:, None]
            bias = torch.zeros(keep.shape, dtype=dtype).masked_fill_(~keep, float("-inf"))
            bias = bias[:, None, :].expand(n[b], self.H, c).reshape(n[b] * self.H, c)
            plan.append((int(g.rows[b, 0]), n[b], c, g.block_tables[b, :nb], bias))
        return plan

    def _attn_bias(self, g: AttnGroup, block_size: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (0 = attend, -inf = not) of a group: [B, 1, L] for decode (broadcast over
        heads), [B, Q*H, L] for prefill (rows ordered query-major, as the scores are)."""
        B, Q = g.rows.shape
        kpos = torch.arange(g.block_tables.shape[1] * block_size, device=g.rows.device)
        keep = (kpos[None, None, :] <= g.qpos[:, :, None]) & (kpos[None, None, :] < g.ctx_len[:, None, None])
        bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))
        if Q == 1:
            return bias
        return bias[:, :, None, :].expand(B, Q, self.H, bias.shape[-1]).reshape(B, Q * self.H, -1)

    @staticmethod
    def _in_order(batch: StepBatch, g: AttnGroup, T: int) -> bool:
        """True for a decode-only step whose one group holds the step's tokens in order (rows = 0..T-1):
        its queries and outputs need no gather and no scatter."""
        B, Q = g.rows.shape
        return (len(batch.groups) == 1 and Q == 1 and B == T
                and torch.equal(g.rows.view(-1), torch.arange(T, device=g.rows.device)))

    def _attention(self, li: int, L: _Layer, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: StepBatch, cache: PagedLatentCache,
                   groups: list[tuple[AttnGroup, torch.Tensor, bool]]) -> torch.Tensor:
        cfg, H, C, R, N, V = self.cfg, self.H, self.C, self.R, self.N, self.V
        T = h.shape[0]
        a = L.attn_in(h)
        q, latent, k_rope = a.split([L.q_in, C, R], dim=-1)
        if cfg.q_lora_rank:
            q = L.q_b(self._rms(q, L.q_norm, 1e-6))
        q = q.view(T, H, N + R)
        q_nope, q_rope = q.split([N, R], dim=-1)
        q_rope, k_rope = self._rope_qk(q_rope, k_rope, cos, sin)
        latent = self._rms(latent, L.kv_norm, 1e-6)
        cache.write(li, batch.slots, latent, k_rope)
        w_uk, w_uv = self._kv_b(L)
        if T == 1 and len(groups) == 1 and groups[0][2] and self._mla_decode_ok(w_uk, w_uv, q_nope, q_rope, cache, li, groups[0][0]):
            # one decode token: the absorbed attention over its paged cache, all heads, in one C++ call
            g = groups[0][0]
            kvc = cache.layers[li]
            blocks = g.block_tables[0].contiguous()
            o = torch.empty(H, V)
            _C.mla_decode_f32_ptr(o.data_ptr(), q_nope.data_ptr(), q_nope.stride(1), q_rope.data_ptr(), q_rope.stride(1),
                                  w_uk.data_ptr(), w_uk.stride(0), w_uv.data_ptr(), w_uv.stride(0), kvc.data_ptr(),
                                  blocks.data_ptr(), kvc.shape[0], kvc.shape[1], int(g.ctx_len[0]), H, N, C, R, V,
                                  self.scale, torch.get_num_threads())
            return L.o_proj(o.view(1, H * V))
        q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)        # [T, H, C]
        qcat = torch.cat([q_lat, q_rope], dim=-1)                               # [T, H, C+R]
        o_lat = None
        for g, bias, in_order in groups:
            B, Q = g.rows.shape
            if isinstance(bias, list):  # one exact-size attention per sequence (_seq_plan)
                if o_lat is None:
                    o_lat = torch.empty(T, H, C, dtype=h.dtype, device=h.device)
                layer = cache.layers[li]
                for r0, n, c, blocks, sbias in bias:
                    kv = layer.index_select(0, blocks).view(-1, C + R)[:c].to(h.dtype)   # [c, C+R]
                    scores = torch.addmm(sbias, qcat[r0:r0 + n].reshape(n * H, C + R), kv.t(), alpha=self.scale)
                    probs = scores.softmax(-1) if scores.dtype == torch.float32 else \
                        scores.softmax(-1, dtype=torch.float32).to(h.dtype)
                    torch.mm(probs, kv[:, :C], out=o_lat[r0:r0 + n].view(n * H, C))
                continue
            kv = cache.gather(li, g.block_tables).to(h.dtype)                  # [B, Lmax, C+R]
            if in_order:
                qg = qcat.view(B, H, C + R)
            else:
                qg = qcat.index_select(0, g.rows.reshape(-1)).view(B, Q * H, C + R)
            # scale and mask ride along in the score GEMM: bias + scale * (q . kv)
            scores = torch.baddbmm(bias, qg, kv.transpose(1, 2), alpha=self.scale)  # [B, Q*H, Lmax]
            if scores.dtype == torch.float32:
                probs = scores.softmax(-1)
            else:  # low precision: softmax in fp32
                probs = scores.softmax(-1, dtype=torch.float32).to(h.dtype)
            out = torch.bmm(probs, kv[..., :C]).view(B * Q, H, C)
            if in_order:
                o_lat = out
                continue
            if o_lat is None:
                o_lat = torch.empty(T, H, C, dtype=h.dtype, device=h.device)
            if Q == 1:
                o_lat.index_copy_(0, g.rows.view(-1), out)
            else:
                keep = g.valid.view(-1)
                o_lat.index_copy_(0, g.rows.view(-1)[keep], out[keep])
        if o_lat is None:  # no group: nothing attends (not a step the scheduler makes)
            o_lat = torch.zeros(T, H, C, dtype=h.dtype, device=h.device)
        o = torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, V]
        return L.o_proj(o.reshape(T, H * V))

    @staticmethod
    def _mla_decode_ok(w_uk: torch.Tensor, w_uv: torch.Tensor, q_nope: torch.Tensor, q_rope: torch.Tensor,
                       cache: PagedLatentCache, li: int, g: AttnGroup) -> bool:
        """Whether the C++ decode attention reads these tensors as laid out: fp32 on the CPU, every head's
        kv_b rows C contiguous floats, the query parts with unit inner stride, the cache layer contiguous."""
        kvc = cache.layers[li]
        return (_C is not None and w_uk.dtype == torch.float32 and w_uk.device.type == "cpu"
                and kvc.dtype == torch.float32 and kvc.is_contiguous() and w_uv.dtype == torch.float32
                and w_uk.stride(2) == 1 and w_uk.stride(1) == w_uk.shape[2]
                and w_uv.stride(2) == 1 and w_uv.stride(1) == w_uv.shape[2] and q_rope.stride(-1) == 1
                and q_nope.stride(-1) == 1 and q_nope.dtype == torch.float32 and q_rope.dtype == torch.float32
                and g.block_tables.dtype == torch.int64)

    def _kv_b(self, L: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b's K and V parts per head, [H, N, C] and [H, V, C] (dequantized for this step in FP8)."""
        if L.kv_b_fp8 is None:
            return L.w_uk, L.w_uv
        kvb = L.kv_b_fp8.weight().view(self.H, self.N + self.V, self.C)
        return kvb[:, :self.N], kvb[:, self.N:]

    @staticmethod
    def _swiglu(x: torch.Tensor, gate_up: _Linear, down: _Linear) -> torch.Tensor:
        g, u = gate_up(x).chunk(2, dim=-1)
        return down(F.silu(g) * u)

    def _moe(self, L: _Layer, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        logits = F.linear(x.float(), L.router)
        if self.triton_moe and L.fused_ok:
            weights, ids = _kernels.k2_router_topk(
                logits, L.router_bias, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group,
                cfg.routed_scaling_factor, cfg.norm_topk_prob)
            out = _kernels.fused_moe(x, L.w13, L.w2, weights, ids, w13_scale=L.s13, w2_scale=L.s2)
        else:
            if _C is not None and logits.device.type == "cpu" and x.shape[0] <= SMALL_ROWS:
                # decode: the router in one C++ call (the torch router is ~15 small ops per layer)
                weights, ids = torch.empty(x.shape[0], cfg.num_experts_per_tok), \
                    torch.empty(x.shape[0], cfg.num_experts_per_tok, dtype=torch.int64)
                _C.route_topk_f32_ptr(weights.data_ptr(), ids.data_ptr(), logits.data_ptr(), L.router_bias.data_ptr(),
                                      x.shape[0], logits.shape[1], logits.shape[1], cfg.num_experts_per_tok, cfg.n_group,
                                      cfg.topk_group, cfg.routed_scaling_factor, cfg.norm_topk_prob)
            else:
                weights, ids = route(logits, L.router_bias, cfg)
            out = self.routed_experts(L, x, weights, ids)
        if L.shared is not None:
            out = out + self._swiglu(x, *L.shared)
        return out

    def routed_experts(self, L: _Layer, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' output of layer L for x [T, D] routed to ids with weights [T, k]."""
        if self.moe_impl == "loop" or self.fp8:  # FP8 off CUDA: dequantize only the experts that run
            return moe_experts(x, L.experts13, L.experts2, weights, ids)  # the reference, one GEMM pair per expert
        return grouped_moe(x, L.w13, L.w2, weights, ids)
