"""Megatron's routed experts on k2sys' Triton kernels (`TrainerConfig.moe_kernels`).

`K2FusedExperts` is megatron's SequentialMLP with the same submodules, parameters, state-dict
keys and sharded checkpoints (so k2sys.trainer.naming, `k2sys convert` and the checkpoint
engine see no difference); only `forward` changes: the dispatcher's expert-grouped rows go
through `k2sys.kernels.grouped_experts` (GEMM1 + SiLU-and-mul, GEMM2 with the routing
probability, grouped weight gradients) instead of one MLP call per local expert.

Weights are read in place: `consolidate_expert_weights` re-points the local experts' fc1 and
fc2 weights into one [E, 2I/tp, H] and one [E, H, I/tp] block (run after the model is on its
device, before DDP wraps it), which the kernels view without a copy. If something later
re-points them irregularly (e.g. a distributed-optimizer buffer with uneven padding) the
forward still works and stacks the weights per call.

Scope (checked at construction): SwiGLU experts without biases, no FP8/FP4 training, no
probabilities applied on the input, no delayed weight-gradient compute.
"""

from __future__ import annotations

import logging

import torch

from k2sys.trainer.cpu_compat import ensure_cpu_shims

ensure_cpu_shims()

from megatron.core.transformer.moe.experts import SequentialMLP  # noqa: E402

log = logging.getLogger("k2sys.trainer")

__all__ = ["K2FusedExperts", "consolidate_expert_weights"]


class K2FusedExperts(SequentialMLP):
    def __init__(self, num_local_experts, config, submodules, pg_collection=None):
        super().__init__(num_local_experts, config, submodules, pg_collection=pg_collection)
        import torch.nn.functional as F

        c = self.config
        bad = [
            (not c.gated_linear_unit or c.activation_func is not F.silu, "activation: needs SwiGLU "
             "(gated_linear_unit=True, activation_func=F.silu)"),
            (c.add_bias_linear, "add_bias_linear: expert biases are not fused; set False"),
            (bool(getattr(c, "fp8", None)) or bool(getattr(c, "fp4", None)), "fp8/fp4 training: use moe_kernels=megatron"),
            (getattr(c, "moe_apply_probs_on_input", False), "moe_apply_probs_on_input: not supported"),
            (getattr(c, "delay_wgrad_compute", False), "delay_wgrad_compute: weight grads are computed in backward"),
        ]
        msgs = [m for b, m in bad if b]
        if msgs:
            raise ValueError("TrainerConfig.moe_kernels=triton/auto cannot fuse these experts: " + "; ".join(msgs)
                             + " (or set moe_kernels=megatron)")
        self._layout_checked = False

    def expert_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return ([e.linear_fc1.weight for e in self.local_experts], [e.linear_fc2.weight for e in self.local_experts])

    def consolidate(self) -> None:
        """Re-point every local expert's fc1/fc2 weight into one contiguous block per kind."""
        for params in self.expert_weights():
            block = torch.stack([p.detach() for p in params])
            for p, view in zip(params, block.unbind(0)):
                p.data = view

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        from k2sys.kernels import grouped_experts, stack_views

        w13, w2 = self.expert_weights()
        if not self._layout_checked:  # once: the layout is fixed before the first forward (after DDP wraps)
            self._layout_checked = True
            if stack_views(w13) is None or stack_views(w2) is None:
                log.warning("K2FusedExperts: expert weights are not evenly spaced in one storage; "
                            "stacking them on every forward (one extra copy of the local experts)")
        out = grouped_experts(permuted_local_hidden_states, permuted_probs.reshape(-1), tokens_per_expert, w13, w2)
        return out, None


def consolidate_expert_weights(model: torch.nn.Module) -> int:
    """Consolidate every K2FusedExperts in `model`; returns how many were found."""
    n = 0
    for m in model.modules():
        if isinstance(m, K2FusedExperts):
            m.consolidate()
            n += 1
    return n
