"""Layouts: how a rank's local tensors map onto the global (HF-named) model tensors.

The model
---------
A *global tensor* is a tensor of the HF DeepseekV3 checkpoint (e.g.
``model.layers.3.mlp.experts.17.gate_proj.weight``, shape [I, H]). A *local tensor* is what
one rank actually holds (a Megatron TP shard, an engine's fused ``w13_weight`` ...). A
:class:`Layout` is the list of local tensors of **one rank** plus :class:`Piece` s, each a
rectangular correspondence::

    Piece(global_name, global_shape, global_box)  <->  (local_name, local_box)

- Boxes are ``Box(offsets, sizes)`` per dim (see :mod:`k2sys.ckpt.types`).
- Elements correspond in row-major order; the two boxes must have equal sizes after unit dims
  are dropped (a [I/tp, H] slice of an expert's gate_proj fits a [1, I/tp, H] box of w13).
- No transposes. A local tensor that is a concatenation (fused QKV, gate|up, w13) simply has
  several pieces. Replicated tensors (norms, routers) appear in every rank's layout with the
  same global box; the planner reads each replica from one rank only.
- A destination layout must cover every element of each of its local tensors exactly once
  (the plan validator checks this); a source layout may hold extra local tensors or padding
  that no piece references (they are never sent).

Writing a layout for another system (e.g. ``megatron_layout(config, tp, ep, rank)``)
---------------------------------------------------------------------------------------
Build ``Layout(tensors={local_name: TensorSpec}, pieces=[Piece(...)...], name=...)``; use
:func:`hf_param_shapes` for the global names/shapes and the helpers :func:`split_range` and
:class:`LayoutBuilder` (``builder.tensor(...)``, ``builder.piece(...)``,
``builder.split(...)``). Everything is validated in ``Layout.__post_init__``.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Optional

import torch

from k2sys.ckpt.types import Box, Piece, PlanError, TensorSpec


def cfg(config: Any, name: str, default: Any = ...) -> Any:
    """Read an HF config field from a dict or an object; a missing required field is an error."""
    if isinstance(config, Mapping):
        v = config.get(name, default)
    else:
        v = getattr(config, name, default)
    if v is ...:
        raise PlanError(f"model config lacks field '{name}' (HF DeepseekV3 config.json names are expected)")
    return v


def hf_param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """HF DeepseekV3ForCausalLM parameter names and shapes (experts stored per index)."""
    H, V, L = cfg(config, "hidden_size"), cfg(config, "vocab_size"), cfg(config, "num_hidden_layers")
    nh = cfg(config, "num_attention_heads")
    q_lora, kv_lora = cfg(config, "q_lora_rank", None), cfg(config, "kv_lora_rank")
    nope, rope, v = cfg(config, "qk_nope_head_dim"), cfg(config, "qk_rope_head_dim"), cfg(config, "v_head_dim")
    E, Im, I = cfg(config, "n_routed_experts"), cfg(config, "moe_intermediate_size"), cfg(config, "intermediate_size")
    first_dense, freq = cfg(config, "first_k_dense_replace", 0), cfg(config, "moe_layer_freq", 1)
    n_shared = cfg(config, "n_shared_experts", 0) or 0
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (H,)
        if q_lora:
            out[p + "self_attn.q_a_proj.weight"] = (q_lora, H)
            out[p + "self_attn.q_a_layernorm.weight"] = (q_lora,)
            out[p + "self_attn.q_b_proj.weight"] = (nh * (nope + rope), q_lora)
        else:
            out[p + "self_attn.q_proj.weight"] = (nh * (nope + rope), H)
        out[p + "self_attn.kv_a_proj_with_mqa.weight"] = (kv_lora + rope, H)
        out[p + "self_attn.kv_a_layernorm.weight"] = (kv_lora,)
        out[p + "self_attn.kv_b_proj.weight"] = (nh * (nope + v), kv_lora)
        out[p + "self_attn.o_proj.weight"] = (H, nh * v)
        out[p + "post_attention_layernorm.weight"] = (H,)
        if E and i >= first_dense and i % freq == 0:
            out[p + "mlp.gate.weight"] = (E, H)
            out[p + "mlp.gate.e_score_correction_bias"] = (E,)
            for e in range(E):
                q = f"{p}mlp.experts.{e}."
                out[q + "gate_proj.weight"] = (Im, H)
                out[q + "up_proj.weight"] = (Im, H)
                out[q + "down_proj.weight"] = (H, Im)
            if n_shared:
                out[p + "mlp.shared_experts.gate_proj.weight"] = (Im * n_shared, H)
                out[p + "mlp.shared_experts.up_proj.weight"] = (Im * n_shared, H)
                out[p + "mlp.shared_experts.down_proj.weight"] = (H, Im * n_shared)
        else:
            out[p + "mlp.gate_proj.weight"] = (I, H)
            out[p + "mlp.up_proj.weight"] = (I, H)
            out[p + "mlp.down_proj.weight"] = (H, I)
    out["model.norm.weight"] = (H,)
    if not cfg(config, "tie_word_embeddings", False):
        out["lm_head.weight"] = (V, H)
    return out


def split_range(n: int, parts: int, rank: int, what: str) -> tuple[int, int]:
    """[start, size) of rank's equal share of n; uneven splits are an error naming `what`."""
    if parts <= 0 or not 0 <= rank < parts:
        raise PlanError(f"{what}: rank {rank} is outside [0, {parts})")
    if n % parts:
        raise PlanError(f"{what}: size {n} is not divisible by {parts} ranks; pick a tp/ep size that divides it")
    size = n // parts
    return rank * size, size


@dataclass(frozen=True)
class Layout:
    """The local tensors of one rank and how they map onto global tensors (see module doc)."""

    tensors: Mapping[str, TensorSpec]
    pieces: tuple[Piece, ...]
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "pieces", tuple(self.pieces))
        gshape: dict[str, tuple[int, ...]] = {}
        for p in self.pieces:
            spec = self.tensors.get(p.local_name)
            if spec is None:
                raise PlanError(f"layout {self.name!r}: piece of {p.global_name} names local tensor "
                                f"{p.local_name} which the layout does not declare")
            if not p.local_box.fits_in(spec.shape):
                raise PlanError(f"layout {self.name!r}: box {p.local_box} does not fit local tensor "
                                f"{p.local_name} {spec.shape} (piece of {p.global_name})")
            prev = gshape.setdefault(p.global_name, p.global_shape)
            if prev != p.global_shape:
                raise PlanError(f"layout {self.name!r}: global tensor {p.global_name} has shape {prev} in one "
                                f"piece and {p.global_shape} in another")
        for k, spec in self.tensors.items():
            if k != spec.name:
                raise PlanError(f"layout {self.name!r}: tensors key {k!r} holds spec named {spec.name!r}")

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the whole layout (computed once; plans are cached by it)."""
        return hashlib.sha1(pickle.dumps((self.name, sorted((k, v.shape, str(v.dtype)) for k, v in self.tensors.items()),
                                          self.pieces), protocol=4)).hexdigest()

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.global_name: p.global_shape for p in self.pieces}

    def by_global(self) -> dict[str, list[Piece]]:
        out: dict[str, list[Piece]] = {}
        for p in self.pieces:
            out.setdefault(p.global_name, []).append(p)
        return out

    def restrict(self, local_names: Iterable[str], name: Optional[str] = None) -> "Layout":
        """The sub-layout holding only `local_names` (e.g. the part of a checkpoint a rank read)."""
        keep = set(local_names)
        missing = keep - set(self.tensors)
        if missing:
            raise PlanError(f"layout {self.name!r}: cannot restrict to unknown tensors {sorted(missing)[:5]}")
        return Layout({k: v for k, v in self.tensors.items() if k in keep},
                      tuple(p for p in self.pieces if p.local_name in keep), name or self.name)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.tensors.values())


class LayoutBuilder:
    """Accumulates local tensors and pieces; `build()` validates them into a Layout."""

    def __init__(self, name: str, dtype: torch.dtype):
        self.name, self.dtype = name, dtype
        self.tensors: dict[str, TensorSpec] = {}
        self.pieces: list[Piece] = []

    def tensor(self, name: str, shape, dtype: Optional[torch.dtype] = None) -> None:
        if name in self.tensors:
            raise PlanError(f"layout {self.name!r}: local tensor {name} declared twice")
        self.tensors[name] = TensorSpec(name, tuple(shape), dtype or self.dtype)

    def piece(self, gname: str, gshape, gbox: Box, lname: str, lbox: Box) -> None:
        self.pieces.append(Piece(gname, tuple(gshape), gbox, lname, lbox))

    def full(self, gname: str, gshape, lname: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> None:
        """A local tensor that is the whole global tensor (replicated or unsharded)."""
        lname = lname or gname
        self.tensor(lname, gshape, dtype)
        self.piece(gname, gshape, Box.full(gshape), lname, Box.full(gshape))

    def split(self, gname: str, gshape, dim: int, parts: int, rank: int, lname: str,
              lbox_offsets: Optional[tuple[int, ...]] = None, lshape: Optional[tuple[int, ...]] = None) -> None:
        """Rank's 1/parts share of `gname` along `dim`, placed at `lbox_offsets` of local `lname`.

        Without lshape the local tensor is declared here with the share's shape; with it, the
        caller declared a larger (fused) local tensor and this adds one piece of it.
        """
        start, size = split_range(gshape[dim], parts, rank, f"{gname} dim {dim}")
        offs = [0] * len(gshape)
        offs[dim] = start
        sizes = list(gshape)
        sizes[dim] = size
        gbox = Box(tuple(offs), tuple(sizes))
        if lshape is None:
            self.tensor(lname, sizes)
            lbox = Box.full(sizes)
        else:
            lo = lbox_offsets or (0,) * len(lshape)
            # Unit dims of the local box (e.g. the expert index of w13) come first.
            lsizes = tuple([1] * (len(lshape) - len(sizes)) + sizes)
            lbox = Box(lo, lsizes)
        self.piece(gname, gshape, gbox, lname, lbox)

    def build(self) -> Layout:
        return Layout(dict(self.tensors), tuple(self.pieces), self.name)


def hf_layout(named_shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype | Mapping[str, torch.dtype] = torch.bfloat16,
              name: str = "hf") -> Layout:
    """Identity layout: every local tensor is the full global tensor of the same name."""
    b = LayoutBuilder(name, torch.bfloat16)
    for gname, shape in named_shapes.items():
        b.full(gname, shape, dtype=dtype[gname] if isinstance(dtype, Mapping) else dtype)
    return b.build()


def engine_tp_layout(config: Any, tp_size: int, tp_rank: int, dtype: torch.dtype = torch.bfloat16) -> Layout:
    """SGLang-like engine layout at tensor parallel size tp_size (names as in its DeepseekV2 model).

    Column-parallel (split output rows): q_b_proj (or q_proj), kv_b_proj, gate|up (fused into
    ``gate_up_proj``), embed_tokens and lm_head (vocab rows). Row-parallel (split input
    columns): o_proj, down_proj. Routed experts per MoE layer: ``mlp.experts.w13_weight``
    [E, 2*I/tp, H] (gate rows then up rows of each expert) and ``mlp.experts.w2_weight``
    [E, H, I/tp]. Norms, the low-rank A projections and the router are replicated.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise PlanError(f"engine_tp_layout: tp_rank {tp_rank} must be in [0, tp_size={tp_size})")
    shapes = hf_param_shapes(config)
    b = LayoutBuilder(f"engine tp{tp_size} rank{tp_rank}", dtype)
    fused_mlps: dict[str, str] = {}  # HF prefix "....mlp." / "....shared_experts." -> fused name
    experts: dict[str, int] = {}     # layer prefix -> E
    for gname, shape in shapes.items():
        if ".mlp.experts." in gname:
            layer, rest = gname.split(".mlp.experts.", 1)
            experts[layer] = max(experts.get(layer, 0), int(rest.split(".", 1)[0]) + 1)
            continue
        if gname.endswith(("gate_proj.weight", "up_proj.weight")):
            fused_mlps.setdefault(gname.rsplit(".", 2)[0], "")
            continue
        if gname.endswith(("q_b_proj.weight", "q_proj.weight", "kv_b_proj.weight", "embed_tokens.weight",
                           "lm_head.weight")):
            b.split(gname, shape, 0, tp_size, tp_rank, gname)
        elif gname.endswith(("o_proj.weight", "down_proj.weight")):
            b.split(gname, shape, 1, tp_size, tp_rank, gname)
        else:
            b.full(gname, shape)
    for prefix in fused_mlps:
        g_shape = shapes[prefix + ".gate_proj.weight"]
        start, size = split_range(g_shape[0], tp_size, tp_rank, prefix + ".gate_proj.weight dim 0")
        lname = prefix + ".gate_up_proj.weight"
        lshape = (2 * size, g_shape[1])
        b.tensor(lname, lshape)
        b.split(prefix + ".gate_proj.weight", g_shape, 0, tp_size, tp_rank, lname, (0, 0), lshape)
        b.split(prefix + ".up_proj.weight", g_shape, 0, tp_size, tp_rank, lname, (size, 0), lshape)
    for layer, E in experts.items():
        g = f"{layer}.mlp.experts.0.gate_proj.weight"
        Im, H = shapes[g]
        _, size = split_range(Im, tp_size, tp_rank, g + " dim 0 (moe_intermediate_size)")
        w13, w2 = f"{layer}.mlp.experts.w13_weight", f"{layer}.mlp.experts.w2_weight"
        b.tensor(w13, (E, 2 * size, H))
        b.tensor(w2, (E, H, size))
        for e in range(E):
            q = f"{layer}.mlp.experts.{e}."
            b.split(q + "gate_proj.weight", (Im, H), 0, tp_size, tp_rank, w13, (e, 0, 0), (E, 2 * size, H))
            b.split(q + "up_proj.weight", (Im, H), 0, tp_size, tp_rank, w13, (e, size, 0), (E, 2 * size, H))
            b.split(q + "down_proj.weight", (H, Im), 1, tp_size, tp_rank, w2, (e, 0, 0), (E, H, size))
    return b.build()
