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
import json
import pickle
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Iterable, Mapping, Optional

import torch

from k2sys.ckpt.types import Box, Piece, PlanError, TensorSpec
from k2sys.models.config import ConfigError, K2Config
from k2sys.models.reference import param_shapes


def cfg(config: Any, name: str, default: Any = ...) -> Any:
    """Read an HF config field from a dict or an object; a missing required field is an error."""
    if isinstance(config, Mapping):
        v = config.get(name, default)
    else:
        v = getattr(config, name, default)
    if v is ...:
        raise PlanError(f"model config lacks field '{name}' (HF DeepseekV3 config.json names are expected)")
    return v


# Fields whose absence would silently change shapes if a default stood in for them.
_REQUIRED = ("hidden_size", "vocab_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
             "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "intermediate_size", "moe_intermediate_size",
             "n_routed_experts")
_SHAPES_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def model_config(config: Any) -> K2Config:
    """A K2Config from a K2Config, an HF config.json dict, or an object with HF fields (e.g. a
    transformers DeepseekV3Config); a missing shape field is a PlanError naming it."""
    if isinstance(config, K2Config):
        return config
    d = dict(config) if isinstance(config, Mapping) else (config.to_dict() if callable(getattr(config, "to_dict", None))
                                                          else {k: v for k, v in vars(config).items()})
    for name in _REQUIRED:
        cfg(d, name)
    if cfg(d, "moe_layer_freq", 1) != 1:
        raise PlanError(f"model config: moe_layer_freq={d['moe_layer_freq']} is not supported (DeepseekV3/Kimi-K2 use 1)")
    try:
        return K2Config.from_hf_dict(d)
    except (ConfigError, TypeError) as e:
        raise PlanError(f"model config: {e}") from e


def hf_param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """HF DeepseekV3ForCausalLM tensor names and shapes (experts stored per index).

    The model package is the single source of these names (`k2sys.models.reference.param_shapes`,
    built on the meta device); it takes ~8 s at Kimi-K2 scale, so results are cached per config."""
    k2 = model_config(config)
    key = json.dumps(k2.to_hf_dict(), sort_keys=True, default=str)
    shapes = _SHAPES_CACHE.get(key)
    if shapes is None:
        shapes = _SHAPES_CACHE[key] = param_shapes(k2)
    return dict(shapes)


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
    """`engine_layout` without expert parallelism (every rank holds every expert, TP-split)."""
    return engine_layout(config, tp_size, 1, tp_rank, dtype)


def engine_layout(config: Any, tp_size: int, ep_size: int, rank: int, dtype: torch.dtype = torch.bfloat16) -> Layout:
    """SGLang-like engine layout of `rank` in a replica of tp_size ranks (names as in its DeepseekV2 model).

    Attention and dense MLPs use TP over all tp_size ranks. Column-parallel (split output
    rows): q_b_proj (or q_proj), kv_b_proj, gate|up (fused into ``gate_up_proj``, also for the
    shared expert), embed_tokens and lm_head (vocab rows). Row-parallel (split input columns):
    o_proj, down_proj. Norms, the low-rank A projections and the router are replicated.

    Routed experts follow SGLang's MoE parallelism: ep_size divides tp_size, the ranks form
    ep_size groups of moe_tp = tp_size // ep_size consecutive ranks; group g holds experts
    [g*E/ep, (g+1)*E/ep) and splits their intermediate dim moe_tp ways. Per MoE layer:
    ``mlp.experts.w13_weight`` [E/ep, 2*I/moe_tp, H] (gate rows then up rows of each local
    expert) and ``mlp.experts.w2_weight`` [E/ep, H, I/moe_tp]; local index = global - first.
    """
    if tp_size < 1 or not 0 <= rank < tp_size:
        raise PlanError(f"engine_layout: rank {rank} must be in [0, tp_size={tp_size})")
    if ep_size < 1 or tp_size % ep_size:
        raise PlanError(f"engine_layout: ep_size={ep_size} must divide tp_size={tp_size} (MoE TP = tp/ep per expert)")
    moe_tp = tp_size // ep_size
    ep_rank, moe_rank = divmod(rank, moe_tp)
    shapes = hf_param_shapes(config)
    b = LayoutBuilder(f"engine tp{tp_size} ep{ep_size} rank{rank}" if ep_size > 1 else f"engine tp{tp_size} rank{rank}",
                      dtype)
    fused_mlps: dict[str, str] = {}  # HF prefix "....mlp" / "....shared_experts" -> fused name
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
            b.split(gname, shape, 0, tp_size, rank, gname)
        elif gname.endswith(("o_proj.weight", "down_proj.weight")):
            b.split(gname, shape, 1, tp_size, rank, gname)
        else:
            b.full(gname, shape)
    for prefix in fused_mlps:
        g_shape = shapes[prefix + ".gate_proj.weight"]
        start, size = split_range(g_shape[0], tp_size, rank, prefix + ".gate_proj.weight dim 0")
        lname = prefix + ".gate_up_proj.weight"
        lshape = (2 * size, g_shape[1])
        b.tensor(lname, lshape)
        b.split(prefix + ".gate_proj.weight", g_shape, 0, tp_size, rank, lname, (0, 0), lshape)
        b.split(prefix + ".up_proj.weight", g_shape, 0, tp_size, rank, lname, (size, 0), lshape)
    for layer, E in experts.items():
        g = f"{layer}.mlp.experts.0.gate_proj.weight"
        Im, H = shapes[g]
        first, n_local = split_range(E, ep_size, ep_rank, f"{layer}.mlp.experts (n_routed_experts)")
        _, size = split_range(Im, moe_tp, moe_rank, g + " dim 0 (moe_intermediate_size / (tp/ep))")
        w13, w2 = f"{layer}.mlp.experts.w13_weight", f"{layer}.mlp.experts.w2_weight"
        w13_shape, w2_shape = (n_local, 2 * size, H), (n_local, H, size)
        b.tensor(w13, w13_shape)
        b.tensor(w2, w2_shape)
        for e in range(first, first + n_local):
            q, le = f"{layer}.mlp.experts.{e}.", e - first
            b.split(q + "gate_proj.weight", (Im, H), 0, moe_tp, moe_rank, w13, (le, 0, 0), w13_shape)
            b.split(q + "up_proj.weight", (Im, H), 0, moe_tp, moe_rank, w13, (le, size, 0), w13_shape)
            b.split(q + "down_proj.weight", (H, Im), 1, moe_tp, moe_rank, w2, (le, 0, 0), w2_shape)
    return b.build()
