"""torch.distributed + megatron parallel_state, under torchrun or as one plain process.

torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain `python` process gets a world of
one over a private TCP store. The backend is NCCL with CUDA, gloo without. The data-parallel size
is what is left: world = tp * pp * dp (experts: world = etp * ep * edp * pp).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(kw_only=True)
class ParallelConfig:
    tp: int = 1
    """Tensor parallel size (attention heads, FFN columns, vocabulary; sequence parallel when MoE+TP)."""
    ep: int = 1
    """Expert parallel size: each EP rank holds n_routed_experts / ep whole experts."""
    pp: int = 1
    """Pipeline parallel size (only 1 is supported by the backend's train_step today)."""
    seed: int = 1234

    def validate(self, world_size: int) -> None:
        for name in ("tp", "ep", "pp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ParallelConfig.{name}: must be a positive int, got {v!r}")
        if self.pp != 1:
            raise ValueError("ParallelConfig.pp: pipeline parallelism is not supported by MegatronBackend; use pp=1")
        if world_size % (self.tp * self.pp):
            raise ValueError(f"ParallelConfig: world size {world_size} is not divisible by tp*pp={self.tp * self.pp}")
        if world_size % (self.ep * self.tp * self.pp) and world_size % (self.ep * self.pp):
            raise ValueError(f"ParallelConfig.ep: world size {world_size} is not divisible by ep={self.ep}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise the default process group if needed; returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=_td(timeout_s))
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=_td(timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _td(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def init_parallel(pc: ParallelConfig) -> None:
    """torch.distributed, megatron parallel_state (tp, ep, pp; dp = the rest) and the model-parallel RNG."""
    from k2sys.trainer.cpu_compat import ensure_cpu_shims

    ensure_cpu_shims()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    _, world = init_distributed()
    pc.validate(world)
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size(), ps.get_expert_model_parallel_world_size()) == (pc.tp, pc.ep):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=pc.tp, pipeline_model_parallel_size=pc.pp,
                                 expert_model_parallel_size=pc.ep)
    model_parallel_cuda_manual_seed(pc.seed)


def ranks() -> dict[str, int]:
    """This process's coordinates: tp/ep/etp/dp ranks and sizes."""
    from megatron.core import parallel_state as ps

    return {
        "rank": dist.get_rank(), "world": dist.get_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
        "ep_rank": ps.get_expert_model_parallel_rank(), "ep": ps.get_expert_model_parallel_world_size(),
        "etp_rank": ps.get_expert_tensor_parallel_rank(), "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
    }


def shutdown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
