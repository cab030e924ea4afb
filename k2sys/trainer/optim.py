"""Optimizers for the Megatron backend: AdamW (megatron's) and Muon (ours), chosen by config.

Muon (Kimi K2 / Moonlight): for each 2-D weight matrix W of attention and MLP/expert linears,
    M <- mu * M + G                  (heavy-ball momentum; Nesterov: use G + mu * M)
    O <- NewtonSchulz5(M)            (approximately U V^T of M's SVD)
    W <- W * (1 - lr * wd) - lr * 0.2 * sqrt(max(rows, cols)) * O
The 0.2 * sqrt(max dim) factor matches AdamW's update RMS so one lr and wd serve both (Moonlight).
Everything else (embeddings, output layer, norms, router) uses AdamW, as in Kimi K2.

Matrices are the HF ones: a TP shard is all-gathered over its tensor-parallel group (the expert-TP
group for routed experts) before Newton-Schulz and sliced back after, and Megatron's fused
linear_fc1 = [gate; up] is orthogonalised as two matrices, gate and up, as HF stores them.

Parallel layouts:
  AdamW  every layout megatron supports: TP, EP, DP, with or without the DistributedOptimizer.
  Muon   TP, EP, DP with Megatron DDP (gradients all-reduced, every DP rank holds whole matrices).
         Not with the DistributedOptimizer: it shards flattened buffers across DP ranks, which
         cuts matrices apart (refused with an error). Pipeline parallel is untested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from k2sys.trainer.cpu_compat import ensure_cpu_shims

ensure_cpu_shims()

from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer  # noqa: E402

from k2sys.trainer.config import OptimConfig  # noqa: E402  (defined apart from megatron; re-exported here)

# Quintic Newton-Schulz coefficients (Jordan et al., Muon): fast convergence of singular values to ~1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation U V^T of a 2-D matrix (fp32), by the quintic iteration."""
    a, b, c = NS_COEFFS
    x = g.float()
    x = x / (x.norm() + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.T if tall else x


@dataclass
class MuonParam:
    """How one local parameter maps onto full HF matrices: TP group, split dim, fused parts."""

    group: Any
    partition_dim: int
    parts: int


def _gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    if n == 1:
        return x
    bufs = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(bufs, x.contiguous(), group=group)
    return torch.cat(bufs, dim=dim)


def orthogonalize(update: torch.Tensor, meta: MuonParam, steps: int) -> tuple[torch.Tensor, float]:
    """Newton-Schulz of the full matrices behind a local shard; returns (local O, scale factor)."""
    n = dist.get_world_size(meta.group) if meta.group is not None else 1
    rank = dist.get_rank(meta.group) if n > 1 else 0
    outs, scale = [], 0.0
    for part in update.chunk(meta.parts, dim=0):
        full = _gather(part, meta.partition_dim, meta.group) if n > 1 else part
        o = newton_schulz(full, steps)
        scale = 0.2 * math.sqrt(max(full.shape))
        if n > 1:
            o = o.chunk(n, dim=meta.partition_dim)[rank]
        outs.append(o)
    return torch.cat(outs, dim=0).to(update.dtype), scale


class Muon(torch.optim.Optimizer):
    """Muon over parameters with `MuonParam` metadata (see module doc). Reads p.grad."""

    def __init__(self, params, meta: dict[torch.Tensor, MuonParam], lr: float, weight_decay: float,
                 momentum: float, nesterov: bool, ns_steps: int):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                      ns_steps=ns_steps))
        self.meta = meta

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                upd = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                o, scale = orthogonalize(upd, self.meta[p], group["ns_steps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"] * scale)


def _megatron_optimizer_config(oc: OptimConfig, params_dtype: torch.dtype) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer="adam", lr=oc.lr, weight_decay=oc.weight_decay, adam_beta1=oc.adam_beta1,
        adam_beta2=oc.adam_beta2, adam_eps=oc.adam_eps, clip_grad=oc.clip_grad,
        use_distributed_optimizer=oc.use_distributed_optimizer,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16, params_dtype=params_dtype,
    )


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """2-D attention / MLP / expert weights; not embeddings, output layer or router."""
    return (p.dim() == 2 and p.requires_grad and not name.endswith("router.weight")
            and not getattr(p, "is_embedding_or_output_parameter", False)
            and ("self_attention." in name or ".mlp." in name))


def _muon_meta(name: str, p: torch.Tensor) -> MuonParam:
    expert = not getattr(p, "allreduce", True)
    tp = getattr(p, "tensor_model_parallel", False)
    group = (ps.get_expert_tensor_parallel_group() if expert else ps.get_tensor_model_parallel_group()) if tp else None
    parts = 2 if name.endswith("linear_fc1.weight") else 1
    return MuonParam(group=group, partition_dim=getattr(p, "partition_dim", 0), parts=parts)


def build_optimizer(model, oc: OptimConfig, params_dtype: torch.dtype = torch.float32):
    """A MegatronOptimizer (ChainedOptimizer) over `model` (a megatron DDP-wrapped GPTModel)."""
    oc.validate()
    mc = _megatron_optimizer_config(oc, params_dtype)
    if oc.name == "adamw":
        return get_megatron_optimizer(mc, [model])
    if params_dtype != torch.float32:
        raise ValueError("OptimConfig.name='muon': only fp32 params are supported by this Muon; use dtype float32")
    named = [(n, p) for n, p in model.named_parameters() if is_muon_param(n, p)]
    dense = [(n, p) for n, p in named if getattr(p, "allreduce", True)]
    expert = [(n, p) for n, p in named if not getattr(p, "allreduce", True)]
    meta = {p: _muon_meta(n, p) for n, p in named}

    def init_state(opt, config=None):
        for g in opt.param_groups:
            for p in g["params"]:
                if len(opt.state[p]) == 0:
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)

    optimizers = []
    for params, stats_group in ((dense, None), (expert, ps.get_expert_tensor_model_pipeline_parallel_group())):
        if not params:
            continue
        muon = Muon([p for _, p in params], meta, oc.lr, oc.weight_decay, oc.muon_momentum, oc.muon_nesterov,
                    oc.muon_ns_steps)
        wrapped = FP32Optimizer(muon, mc, init_state)
        if stats_group is not None:
            wrapped.grad_stats_parallel_group = stats_group
        optimizers.append(wrapped)
    # AdamW for the rest: hide the Muon params from megatron's builder for the duration of the call.
    for _, p in named:
        p.requires_grad_(False)
    try:
        adam = get_megatron_optimizer(mc, [model])
    finally:
        for _, p in named:
            p.requires_grad_(True)
    adam_list = adam.chained_optimizers if isinstance(adam, ChainedOptimizer) else [adam]
    return ChainedOptimizer(optimizers + list(adam_list))


def set_lr(optimizer, lr: float, weight_decay: float) -> None:
    """Set lr / weight decay on every param group (megatron's lr_mult / wd_mult respected)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
        g["weight_decay"] = weight_decay * g.get("wd_mult", 1.0)
