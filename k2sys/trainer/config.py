"""The trainer's configs, apart from megatron so that a job config can nest them without importing it.

OptimConfig (AdamW / Muon, k2sys.trainer.optim builds the optimizer) and TrainerConfig (k2sys.trainer.backend
MegatronBackend's `train=`); both modules re-export them. The RL job nests TrainerConfig as `trainer.*`
(k2sys.coordinator.sections.TrainerSection).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch

__all__ = ["OptimConfig", "TrainerConfig"]


@dataclass(kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """'adamw' or 'muon' (Muon for 2-D attention/MLP weights, AdamW for the rest)."""
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global grad-norm clip (0 disables)."""
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    use_distributed_optimizer: bool = False
    """AdamW only: shard optimizer state over data-parallel ranks (megatron DistributedOptimizer)."""

    def validate(self) -> None:
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"OptimConfig.name: expected 'adamw' or 'muon', got {self.name!r}")
        if self.name == "muon" and self.use_distributed_optimizer:
            raise ValueError("OptimConfig.use_distributed_optimizer: Muon needs whole matrices on every DP rank; "
                             "set use_distributed_optimizer=False (or use adamw)")
        if not self.lr >= 0:
            raise ValueError(f"OptimConfig.lr: must be >= 0, got {self.lr}")
        if self.muon_ns_steps < 1:
            raise ValueError(f"OptimConfig.muon_ns_steps: must be >= 1, got {self.muon_ns_steps}")


@dataclass(kw_only=True)
class TrainerConfig:
    optim: OptimConfig = field(default_factory=OptimConfig)
    dtype: Literal["auto", "float32", "bfloat16"] | None = None
    """Params dtype: float32 / bfloat16; None = the model config's torch_dtype; auto = the model config's on
    GPU, float32 on CPU (megatron's CPU path is fp32). `resolved()` decides auto for this process."""
    micro_batch_size: int | None = None
    """Rows per forward/backward on each rank (gradient accumulation); None = all local rows at once."""
    bias_update_rate: float = 1e-3
    """Aux-loss-free balancing: expert bias moves by this * sign(mean load - load) per step."""
    seq_aux_loss_coeff: float = 0.0
    recompute: bool = False
    moe_kernels: Literal["auto", "triton", "megatron"] = "auto"
    """Routed experts: auto (k2sys' Triton fused MoE on CUDA, megatron's SequentialMLP elsewhere),
    triton (always; CPU only under TRITON_INTERPRET=1, for tests) or megatron."""

    def fused_experts(self) -> bool:
        """Whether this config puts the routed experts on the Triton kernels on this machine."""
        if self.moe_kernels == "megatron":
            return False
        try:
            from k2sys.kernels import resolve_moe_kernels
        except Exception as e:  # noqa: BLE001 - kernels (triton) not importable
            if self.moe_kernels == "triton":
                raise ValueError(f"TrainerConfig.moe_kernels=triton: k2sys.kernels does not import ({e}); "
                                 "install k2sys[kernels] or use auto/megatron") from e
            return False
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return resolve_moe_kernels(self.moe_kernels, device, "TrainerConfig.moe_kernels")

    def validate(self) -> None:
        self.optim.validate()
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"TrainerConfig.micro_batch_size: must be >= 1 or None, got {self.micro_batch_size}")
        if self.dtype not in (None, "auto", "float32", "bfloat16"):
            raise ValueError(f"TrainerConfig.dtype: expected None, 'auto', 'float32' or 'bfloat16', got {self.dtype!r}")
        if self.moe_kernels not in ("auto", "triton", "megatron"):
            raise ValueError(f"TrainerConfig.moe_kernels: expected auto, triton or megatron, got {self.moe_kernels!r}")
        self.fused_experts()  # raises when triton is asked for where it cannot run

    def resolved(self) -> "TrainerConfig":
        """A plain TrainerConfig of these fields (also of a subclass that adds its own) with dtype=auto decided."""
        d = {f.name: getattr(self, f.name) for f in fields(TrainerConfig)}
        if d["dtype"] == "auto":
            d["dtype"] = None if torch.cuda.is_available() else "float32"
        return TrainerConfig(**d)
