"""megatron-core 0.16.1 on a machine without CUDA: the few shims it needs, scoped to megatron.

megatron-core assumes a CUDA device in a handful of places (docs/FACTS.md). Rather than patching torch
for the whole process, every `megatron.core.*` module whose global `torch` is the torch module
gets a *view* of torch (`MegatronTorchView`) instead: attribute reads fall through to torch
unless a shim overrides that one name. Code outside megatron (ours, transformers, tests) sees
plain torch, unchanged. Each shim names the upstream code it works around and can be switched
off on its own (`apply_cpu_shims(disable=...)`), which is how tests/test_trainer_cpu_compat.py
shows that each one is needed.

Pipeline: import the megatron modules we use -> build the torch view with the enabled shims ->
swap `torch` in every loaded megatron.core module -> patch the few module attributes that no
view can reach (TE-only names, string type checks, CUDA RNG helpers).

Applied only when `torch.cuda.is_available()` is False; a CUDA machine runs megatron untouched.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Modules the trainer imports; they are loaded before the view is installed so all get it.
_MEGATRON_MODULES = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.transformer.multi_latent_attention",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.shared_experts",
    "megatron.core.distributed",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.exchange_utils",
)


@dataclass(frozen=True)
class Shim:
    name: str
    upstream: str
    """The megatron-core 0.16.1 code this works around."""
    install: Callable[["_State"], None]


class MegatronTorchView(types.ModuleType):
    """`torch` as megatron.core modules see it on CPU: torch, except for the overridden names."""

    def __init__(self, overrides: dict[str, Any]):
        super().__init__("torch")
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:  # only called for names not overridden
        return getattr(torch, name)


class _CudaView(types.ModuleType):
    """`torch.cuda` as megatron.core modules see it on CPU."""

    def __init__(self, overrides: dict[str, Any]):
        super().__init__("torch.cuda")
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _State:
    def __init__(self) -> None:
        self.torch_overrides: dict[str, Any] = {}
        self.cuda_overrides: dict[str, Any] = {}
        self.undo: list[Callable[[], None]] = []

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        old = getattr(obj, name, _MISSING)
        setattr(obj, name, value)
        self.undo.append(lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old))


_MISSING = object()


# ---- the shims -------------------------------------------------------------------------------
def _current_device(s: _State) -> None:
    s.cuda_overrides["current_device"] = lambda: torch.device("cpu")
    s.cuda_overrides["device_count"] = lambda: 0


def _is_cuda(dev: Any) -> bool:
    return (isinstance(dev, str) and dev.startswith("cuda")) or (isinstance(dev, torch.device) and dev.type == "cuda")


def _cpu_factory(fn: Callable) -> Callable:
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    return wrapper


def _device_literals(s: _State) -> None:
    for name in ("tensor", "zeros", "ones", "empty", "full", "empty_like", "zeros_like"):
        s.torch_overrides[name] = _cpu_factory(getattr(torch, name))


class _NullStream:
    def __init__(self, *a, **k) -> None:
        pass

    def wait_stream(self, *a, **k) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *a, **k) -> "_NullEvent":
        return _NullEvent()


class _NullEvent(_NullStream):
    def record(self, *a, **k) -> None:
        pass

    def wait(self, *a, **k) -> None:
        pass

    def query(self) -> bool:
        return True


def _streams(s: _State) -> None:
    null = _NullStream()
    s.cuda_overrides.update(
        synchronize=lambda *a, **k: None,
        current_stream=lambda *a, **k: null,
        default_stream=lambda *a, **k: null,
        Stream=_NullStream,
        Event=_NullEvent,
        stream=lambda *a, **k: contextlib.nullcontext(),
    )


def _rng(s: _State) -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    s.setattr(random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state())
    s.setattr(random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state))
    s.cuda_overrides.update(
        get_rng_state=lambda *a, **k: torch.get_rng_state(),
        set_rng_state=lambda state, *a, **k: torch.set_rng_state(state),
        manual_seed=lambda seed: torch.manual_seed(seed),
    )


def _float_tensor_type(s: _State) -> None:
    # clip_grads asserts `param.grad.type() == 'torch.cuda.FloatTensor'`: a string test no view
    # reaches. The replacement scales grads exactly as upstream's multi_tensor_scale does.
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")

    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    s.setattr(clip_grads, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)
    s.setattr(optimizer, "clip_grad_by_total_norm_fp32", clip_grad_by_total_norm_fp32)


def _te_general_gemm(s: _State) -> None:
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        s.setattr(moe_utils, "te_general_gemm", None)


def _mla_have_te(s: _State) -> None:
    mla = importlib.import_module("megatron.core.transformer.multi_latent_attention")
    if not _te_importable():
        s.setattr(mla, "HAVE_TE", False)


def _alltoall_splits(s: _State) -> None:
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    upstream = dispatcher.maybe_move_tensor_to_cpu

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return upstream(tensor, as_numpy=as_numpy, record_stream=record_stream)

    s.setattr(dispatcher, "maybe_move_tensor_to_cpu", maybe_move_tensor_to_cpu)


SHIMS: tuple[Shim, ...] = (
    Shim("current_device", "`device=torch.cuda.current_device()` in tensor factories (moe/router.py "
         "expert_bias buffers, distributed/param_and_grad_buffer.py grad buffers, ...)", _current_device),
    Shim("device_literals", "hard-coded device='cuda' tensors (optimizer/optimizer.py found_inf/_scale_one, "
         "optimizer/clip_grads.py norms, transformer/utils.py masks)", _device_literals),
    Shim("streams", "torch.cuda.synchronize/current_stream/Stream/Event in distributed/"
         "param_and_grad_buffer.py and the MoE token dispatcher", _streams),
    Shim("rng", "tensor_parallel/random.py CudaRNGStatesTracker: torch.cuda.get/set_rng_state, "
         "manual_seed and _get/_set_cuda_rng_state (model_parallel_cuda_manual_seed)", _rng),
    Shim("float_tensor_type", "optimizer/clip_grads.py clip_grad_by_total_norm_fp32 asserts "
         "grad.type() == 'torch.cuda.FloatTensor'", _float_tensor_type),
    Shim("te_general_gemm", "transformer/moe/moe_utils.py defines te_general_gemm only when Transformer "
         "Engine imports, the router reads it unconditionally (NameError)", _te_general_gemm),
    Shim("mla_have_te", "transformer/multi_latent_attention.py sets HAVE_TE=True without TE, then "
         "`isinstance(x, None)` TypeError at MLASelfAttention construction", _mla_have_te),
    Shim("alltoall_splits", "transformer/moe/token_dispatcher.py MoEAlltoAllTokenDispatcher turns split sizes "
         "into numpy only for CUDA tensors (moe_utils.maybe_move_tensor_to_cpu); gloo's all_to_all_single "
         "rejects CPU tensor splits (TypeError) under expert parallelism", _alltoall_splits),
)
SHIM_NAMES = tuple(s.name for s in SHIMS)

_applied: _State | None = None
_applied_names: tuple[str, ...] = ()


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_shims(disable: tuple[str, ...] | list[str] = (), force: bool = False) -> tuple[str, ...]:
    """Install the shims (all but `disable`) if CUDA is absent (or `force`); returns the names applied.

    Idempotent for the same selection; a different selection reverts the old one first.
    """
    global _applied, _applied_names
    unknown = set(disable) - set(SHIM_NAMES)
    if unknown:
        raise ValueError(f"apply_cpu_shims(disable=...): unknown shims {sorted(unknown)}; known: {SHIM_NAMES}")
    if not (needed() or force):
        return ()
    names = tuple(n for n in SHIM_NAMES if n not in disable)
    if _applied is not None:
        if names == _applied_names:
            return names
        revert_cpu_shims()
    for mod in _MEGATRON_MODULES:
        importlib.import_module(mod)
    state = _State()
    for shim in SHIMS:
        if shim.name in names:
            shim.install(state)
    view = MegatronTorchView({**state.torch_overrides, "cuda": _CudaView(state.cuda_overrides)})
    for mod in list(sys.modules.values()):
        if (isinstance(mod, types.ModuleType) and mod.__name__.startswith("megatron.core")
                and mod.__dict__.get("torch") is torch):
            state.setattr(mod, "torch", view)
    _applied, _applied_names = state, names
    return names


def ensure_cpu_shims() -> tuple[str, ...]:
    """Apply all shims unless a selection is already applied (what importers of megatron call)."""
    return _applied_names if _applied is not None else apply_cpu_shims()


def revert_cpu_shims() -> None:
    """Undo everything apply_cpu_shims did (megatron modules see plain torch again)."""
    global _applied, _applied_names
    if _applied is None:
        return
    for undo in reversed(_applied.undo):
        undo()
    _applied, _applied_names = None, ()


def applied() -> tuple[str, ...]:
    return _applied_names
