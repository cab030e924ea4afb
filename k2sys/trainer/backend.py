"""MegatronBackend: the TrainerBackend contract (DESIGN.md) on megatron-core.

    MegatronBackend.from_hf(dir) -> train_step(batch, loss_fn) ... -> offload() | engine runs | onload()
                                 -> export_shards() -> checkpoint engine;  save(dir) / load(dir)

Every rank of a torchrun job builds the backend with the same arguments and calls the same
methods with the same *global* batch; each rank takes its data-parallel rows itself.

Batch (dict of CPU or device tensors; B rows of T tokens, B divisible by the DP size):
  tokens        int  [B, T]  input ids
  labels        int  [B, T]  the token to predict at each position (ignored where loss_mask is 0)
  loss_mask     any  [B, T]  1 where the position counts
  position_ids  int  [B, T]  optional; must be 0..T-1 per row, or restart at 0 at each packed sequence
                             (megatron's MLA derives RoPE positions from cu_seqlens; other positions
                             are refused, not silently ignored)
  cu_seqlens    int  [n+1]   optional packed-sequence boundaries over the flattened B*T stream
                             (0, ..., B*T; every row end must be a boundary). Attention is causal
                             *within* each sequence only.

loss_fn(logprobs [b, T] fp32 (log p(labels)), local batch) -> (loss_sum, denom): the backend
back-propagates loss_sum and divides gradients by the global sum of denom (over micro-batches and
DP ranks), so the result equals one big batch's sum/denom whatever the layout. The reported loss
is sum(loss_sum) / sum(denom). `sft_loss` is token-mean cross entropy on loss_mask.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from k2sys.models.config import K2Config
from k2sys.models.hf_io import write_json_atomic
from k2sys.trainer.cpu_compat import ensure_cpu_shims
from k2sys.trainer.formats import FORMAT_DIST, FORMAT_MODEL_DIST, META
from k2sys.trainer.naming import load_hf_into, local_names, megatron_layout, megatron_to_hf
from k2sys.trainer.flat_state import flatten_state
from k2sys.trainer.offload import StateOffloader
from k2sys.trainer.config import TrainerConfig  # defined apart from megatron; re-exported here
from k2sys.trainer.optim import OptimConfig, build_optimizer, set_lr
from k2sys.trainer.parallel import ParallelConfig, init_parallel, ranks

ensure_cpu_shims()

from megatron.core import dist_checkpointing, parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402
from megatron.core.distributed.finalize_model_grads import finalize_model_grads  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.tensor_parallel import (  # noqa: E402
    gather_from_tensor_model_parallel_region, vocab_parallel_cross_entropy)

from k2sys.trainer.spec import build_gpt_model, te_available, transformer_config  # noqa: E402

LossFn = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


# ---- megatron's checkpoint writer, without helper processes that outlive us ----------------------------
_FORK_GUARD: dict[str, Any] = {"on": False, "parent": 0, "prctl": None}


def _die_with_parent_after_fork() -> None:
    """In a child forked while _writer_processes_die_with_us is active: SIGKILL it when its parent dies."""
    prctl = _FORK_GUARD["prctl"]
    if not _FORK_GUARD["on"] or prctl is None:
        return
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (resolved in the parent: no dlopen in a forked child)
    if os.getppid() != _FORK_GUARD["parent"]:  # the parent died before prctl took effect
        os._exit(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_die_with_parent_after_fork)


@contextlib.contextmanager
def _writer_processes_die_with_us():
    """A synchronous dist_checkpointing.save without processes that survive a kill -9 of this one.

    megatron's torch_dist writer (FileSystemWriterAsync) collects results through a queue that it creates
    on first use as `spawn` context's Manager().Queue(): a ~280 MB Manager server process plus a
    resource_tracker, kept for the life of the process and never reaped when it is SIGKILLed. A save
    that runs in this process (ours always do: no async_save) puts and gets that queue in this process,
    so a plain queue.Queue serves. The writer's per-save `fork` workers get PR_SET_PDEATHSIG (only
    forks made in this block: long-lived children of other threads are not touched)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
    if _FORK_GUARD["prctl"] is None and sys.platform.startswith("linux"):
        import ctypes

        _FORK_GUARD["prctl"] = ctypes.CDLL(None, use_errno=True).prctl
    _FORK_GUARD.update(on=True, parent=os.getpid())
    try:
        yield
    finally:
        _FORK_GUARD["on"] = False


def sft_loss(logprobs: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean cross entropy over loss_mask: (sum of -log p, number of tokens)."""
    mask = batch["loss_mask"].to(logprobs.dtype)
    return -(logprobs * mask).sum(), mask.sum()


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    num_tokens: float
    """Global sum of the loss_fn denominators (tokens for SFT)."""
    skipped: bool
    seconds: float


class BatchError(ValueError):
    """A batch does not follow the format in the backend docstring; the message names the field."""


def _proc_status_bytes(key: str) -> int:
    """VmRSS / VmHWM of this process in bytes (Linux), 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS, so it measures the peak of what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class MegatronBackend:
    """One rank's Megatron GPTModel + DDP + optimizer for a K2Config (see module doc)."""

    def __init__(self, config: K2Config, parallel: ParallelConfig | None = None, train: TrainerConfig | None = None,
                 hf_state: Mapping[str, torch.Tensor] | None = None, use_te: bool | None = None):
        self.config = config
        self.parallel = parallel or ParallelConfig()
        self.train = (train or TrainerConfig()).resolved()  # dtype=auto decided for this process
        self.train.validate()
        init_parallel(self.parallel)
        self.use_te = te_available() if use_te is None else use_te
        self.tc = transformer_config(config, self.parallel.tp, self.parallel.ep, self.train.dtype,
                                     self.train.bias_update_rate, self.train.seq_aux_loss_coeff, self.train.recompute)
        self.dtype = self.tc.params_dtype
        self.ranks = ranks()
        if self.ranks["etp"] != self.ranks["tp"] or self.ranks["etp_rank"] != self.ranks["tp_rank"]:
            raise RuntimeError("MegatronBackend: expert tensor parallel must equal tensor parallel (megatron default)")
        self.fused_experts = self.train.fused_experts()
        rss_before = _proc_status_bytes("VmRSS")
        gpt = build_gpt_model(config, self.tc, self.use_te, self.fused_experts)
        self.load_stats: dict[str, int] = {}
        if hf_state is not None:
            _reset_peak_rss()
            self._load_local(gpt, hf_state)
            # The rank's share = its parameters and buffers; peak = the most resident memory while loading
            # (host RSS; on GPU the parameters live on the device and the host peak is the read buffers).
            self.load_stats = {"rss_before_model": rss_before, "rss_peak_load": _proc_status_bytes("VmHWM"),
                               "share_bytes": sum(t.numel() * t.element_size() for t in gpt.state_dict().values()
                                                  if isinstance(t, torch.Tensor))}
        ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=self.train.optim.use_distributed_optimizer,
                                            bucket_size=None)
        self.model = DistributedDataParallel(config=self.tc, ddp_config=ddp, module=gpt)
        self.optimizer = build_optimizer(self.model, self.train.optim, self.dtype)
        set_lr(self.optimizer, self.train.optim.lr, self.train.optim.weight_decay)
        self.step = 0
        self._offloader: StateOffloader | None = None
        self._state_flat = False  # optimizer state moved into flat buffers (k2sys.trainer.flat_state)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path: str | os.PathLike, parallel: ParallelConfig | None = None,
                train: TrainerConfig | None = None, use_te: bool | None = None) -> "MegatronBackend":
        """Each rank reads only the slices it owns from the checkpoint (positioned reads, no full copy);
        FP8 block-scaled release checkpoints are dequantized exactly (k2sys.models.checkpoint).
        use_te: the Transformer Engine layer spec (None: when transformer_engine imports)."""
        from k2sys.models.checkpoint import HFCheckpoint

        ckpt = HFCheckpoint(path)
        try:
            return cls(ckpt.config, parallel, train, hf_state=ckpt, use_te=use_te)
        finally:
            ckpt.close()

    @classmethod
    def from_model(cls, model, parallel: ParallelConfig | None = None,
                   train: TrainerConfig | None = None) -> "MegatronBackend":
        """From a k2sys.models.K2ForCausalLM (e.g. build_model(cfg, seed)): same weights on every layout."""
        return cls(model.config, parallel, train, hf_state=model.state_dict())

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, parallel: ParallelConfig | None = None,
                        train: TrainerConfig | None = None) -> "MegatronBackend":
        """A backend resumed from `save(path)` (any TP/EP layout; dist_checkpointing reshards), or started from
        the weights of a `k2sys convert hf-to-megatron` checkpoint (fresh optimizer, step 0)."""
        meta = json.loads((Path(path) / META).read_text())
        if meta.get("format") == FORMAT_MODEL_DIST:
            backend = cls(K2Config.from_hf_dict(meta["config"]), parallel, train, use_te=meta.get("spec") == "te")
            backend.load(path, optimizer=False)
            return backend
        if meta.get("format") != FORMAT_DIST:
            raise ValueError(f"{path}: format {meta.get('format')!r} is not a MegatronBackend.save or "
                             "`k2sys convert hf-to-megatron` checkpoint")
        cfg = K2Config.from_hf_dict(meta["config"])
        if train is None:
            t = dict(meta["train"])
            t["optim"] = OptimConfig(**t["optim"])
            train = TrainerConfig(**t)
        backend = cls(cfg, parallel, train)
        backend.load(path, optimizer=train.optim.name == meta["train"]["optim"]["name"])
        return backend

    def _load_local(self, gpt, hf_state: Mapping[str, torch.Tensor]) -> None:
        """This rank's pieces of `hf_state` (a state dict or an HFCheckpoint) copied straight into gpt's
        parameters and buffers."""
        own = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
        table = set(local_names(self.config, self.parallel.tp, self.parallel.ep, self.ranks["tp_rank"],
                                self.ranks["ep_rank"], self.use_te))
        if set(own) != table:
            raise KeyError(f"MegatronBackend: naming table and model disagree: model-only {sorted(set(own) - table)[:4]}, "
                           f"table-only {sorted(table - set(own))[:4]}")
        load_hf_into(own, hf_state, self.config, self.parallel.tp, self.parallel.ep, self.ranks["tp_rank"],
                     self.ranks["ep_rank"], self.use_te)

    # ---- batches ----------------------------------------------------------------------------
    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _local_rows(self, batch: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Validate the global batch, take this DP rank's rows, split them into micro-batches."""
        for key in ("tokens",):
            if key not in batch:
                raise BatchError(f"batch['{key}'] is required (int [B, T])")
        tokens = batch["tokens"]
        if tokens.dim() != 2:
            raise BatchError(f"batch['tokens'] must be [B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        for key in ("labels", "loss_mask", "position_ids"):
            if key in batch and tuple(batch[key].shape) != (B, T):
                raise BatchError(f"batch['{key}'] must have the shape of tokens {(B, T)}, got {tuple(batch[key].shape)}")
        dp, dp_rank = self.ranks["dp"], self.ranks["dp_rank"]
        if B % dp:
            raise BatchError(f"batch: {B} rows cannot be split over {dp} data-parallel ranks; use a multiple of {dp}")
        segs = self._segments(batch, B, T)
        rows = B // dp
        mbs = self.train.micro_batch_size or rows
        if rows % mbs:
            raise BatchError(f"TrainerConfig.micro_batch_size={mbs} does not divide the {rows} rows per DP rank")
        out = []
        for r0 in range(dp_rank * rows, (dp_rank + 1) * rows, mbs):
            mb = {k: v[r0:r0 + mbs] for k, v in batch.items() if k != "cu_seqlens" and torch.is_tensor(v)
                  and v.dim() >= 1 and v.shape[0] == B}
            if segs is not None:
                lo, hi = r0 * T, (r0 + mbs) * T
                mb["cu_seqlens"] = torch.tensor([b - lo for b in segs if lo <= b <= hi], dtype=torch.int32)
            out.append(mb)
        return out

    def _segments(self, batch, B: int, T: int) -> list[int] | None:
        cu = batch.get("cu_seqlens")
        pos = batch.get("position_ids")
        if cu is None:
            if pos is not None and not torch.equal(pos.cpu(), torch.arange(T).expand(B, T)):
                raise BatchError("batch['position_ids'] must be 0..T-1 in every row without cu_seqlens "
                                 "(megatron MLA computes RoPE positions itself); pack with cu_seqlens instead")
            return None
        b = [int(x) for x in cu.reshape(-1).tolist()]
        if b[0] != 0 or b[-1] != B * T or any(y <= x for x, y in zip(b, b[1:])):
            raise BatchError(f"batch['cu_seqlens'] must rise strictly from 0 to B*T={B * T}, got {b[:8]}...")
        missing = sorted(set(range(T, B * T, T)) - set(b))
        if missing:
            raise BatchError(f"batch['cu_seqlens'] must include every row end (multiples of T={T}); missing {missing[:4]}")
        if pos is not None:
            want = torch.cat([torch.arange(y - x) for x, y in zip(b, b[1:])]).view(B, T)
            if not torch.equal(pos.cpu(), want):
                raise BatchError("batch['position_ids'] must restart at 0 at every cu_seqlens boundary")
        return b

    def _forward_logprobs(self, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        """log p(labels) [b, T] fp32 for one micro-batch (vocab-parallel safe)."""
        dev = self._device()
        tokens = mb["tokens"].to(dev)
        b, T = tokens.shape
        labels = mb.get("labels", torch.zeros_like(mb["tokens"])).to(dev).long()
        if "loss_mask" in mb:
            labels = torch.where(mb["loss_mask"].to(dev).bool(), labels, torch.zeros_like(labels))
        if ((labels < 0) | (labels >= self.config.vocab_size)).any():
            raise BatchError(f"batch['labels'] has ids outside [0, vocab_size={self.config.vocab_size}) where loss_mask is 1")
        tp = self.ranks["tp"]
        packed = None
        if "cu_seqlens" in mb:
            cu = mb["cu_seqlens"].to(dev).int()
            n = b * T
            pad = (-n) % tp
            tokens, labels = tokens.reshape(1, n), labels.reshape(1, n)
            if pad:  # an extra (ignored) sequence so the pack splits evenly under sequence parallel
                tokens = torch.cat([tokens, tokens.new_zeros(1, pad)], 1)
                labels = torch.cat([labels, labels.new_zeros(1, pad)], 1)
                cu = torch.cat([cu, cu.new_tensor([n + pad])])
            maxlen = int((cu[1:] - cu[:-1]).max())
            packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                     max_seqlen_q=maxlen, max_seqlen_kv=maxlen)
            out = self.model(tokens, None, None, packed_seq_params=packed)
            lp = -vocab_parallel_cross_entropy(out.float(), labels)
            return lp[:, :n].reshape(b, T)
        pad = (-T) % tp
        if pad:  # causal: tokens appended at the end change nothing before them
            tokens = torch.cat([tokens, tokens.new_zeros(b, pad)], 1)
            labels = torch.cat([labels, labels.new_zeros(b, pad)], 1)
        out = self.model(tokens, None, None)
        lp = -vocab_parallel_cross_entropy(out.float().transpose(0, 1).contiguous(), labels.t().contiguous()).t()
        return lp[:, :T]

    # ---- the contract -----------------------------------------------------------------------
    def train_step(self, batch: Mapping[str, torch.Tensor], loss_fn: LossFn = sft_loss) -> StepResult:
        """One optimizer step on the global batch (see module doc for the format and loss_fn)."""
        self._require_onloaded("train_step")
        t0 = time.perf_counter()
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        total_loss = torch.zeros((), dtype=torch.float64)
        total_denom = torch.zeros((), dtype=torch.float32, device=self._device())
        for mb in self._local_rows(batch):
            lp = self._forward_logprobs(mb)
            loss_sum, denom = loss_fn(lp, {k: v.to(lp.device) for k, v in mb.items()})
            loss_sum.backward()
            total_loss += loss_sum.detach().double().cpu()
            total_denom += torch.as_tensor(denom, dtype=torch.float32, device=total_denom.device).detach()
        num_tokens = total_denom.clone()
        # DP all-reduce of grads, SP norm grads, expert-bias update, then grads /= global denom.
        finalize_model_grads([self.model], num_tokens=num_tokens)
        ok, grad_norm, _ = self.optimizer.step()
        stats = torch.stack([total_loss.float(), total_denom.cpu()]).to(total_denom.device)
        dist.all_reduce(stats, group=ps.get_data_parallel_group())
        self.step += 1
        return StepResult(loss=float(stats[0] / stats[1].clamp(min=1e-12)), grad_norm=float(grad_norm or 0.0),
                          num_tokens=float(stats[1]), skipped=not ok, seconds=time.perf_counter() - t0)

    @torch.no_grad()
    def logprobs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log p(labels[t] | tokens[:t+1]) [B, T] fp32 on CPU for the global batch (all ranks get it).

        0 where loss_mask is 0 (if given). Each DP rank computes its rows; rows are all-gathered."""
        self._require_onloaded("logprobs")
        self.model.eval()
        parts = [self._forward_logprobs(mb) for mb in self._local_rows(batch)]
        local = torch.cat(parts, 0)
        if "loss_mask" in batch:
            rows = local.shape[0]
            r0 = self.ranks["dp_rank"] * rows
            local = local * batch["loss_mask"][r0:r0 + rows].to(local.device, local.dtype)
        dp = self.ranks["dp"]
        if dp > 1:
            bufs = [torch.empty_like(local) for _ in range(dp)]
            dist.all_gather(bufs, local.contiguous(), group=ps.get_data_parallel_group())
            local = torch.cat(bufs, 0)
        return local.cpu()

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [B, T, V] (gathered over TP) of a batch every rank holds whole."""
        self.model.eval()
        out = self.model(tokens.to(self._device()), None, None)
        return gather_from_tensor_model_parallel_region(out).float().cpu()

    def set_lr(self, lr: float, weight_decay: float | None = None) -> None:
        set_lr(self.optimizer, lr, self.train.optim.weight_decay if weight_decay is None else weight_decay)

    # ---- ownership switching ----------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of trainer state: params, buffers, grad buffers, optimizer state."""
        # the module's tensors are the same objects for the model's life (walking its ~1000 modules
        # costs ~1 ms of every switch); their storages are read at each offload
        mod = getattr(self, "_module_tensors", None)
        if mod is None:
            mod = list(self.model.module.parameters()) + list(self.model.module.buffers())
            for buf in list(self.model.buffers) + list(self.model.expert_parallel_buffers):
                for name in ("param_data", "grad_data"):
                    t = getattr(buf, name, None)
                    if t is not None:
                        mod.append(t)
            self._module_tensors = mod
        ts = list(mod)
        opts = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        for opt in opts:
            inner = opt.optimizer
            for g in inner.param_groups:
                ts.extend(g["params"])
            for st in inner.state.values():
                ts.extend(v for v in st.values() if torch.is_tensor(v) and v.dim() > 0)
        return ts

    def offload(self) -> dict[str, float]:
        """Params, grads and optimizer state -> host DRAM (pinned with CUDA); device storage freed."""
        if self._offloader is None:
            self._offloader = StateOffloader()
        self._flatten_state()
        return self._offloader.offload(self._state_tensors())

    def _inner_optimizers(self) -> list[torch.optim.Optimizer]:
        return [o.optimizer for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer])]

    def _flatten_state(self) -> None:
        """Once the optimizer has state (its first step, or a loaded checkpoint), move the per-parameter
        moments into flat buffers: an offload then moves a few large storages instead of ~2 per
        parameter (k2sys.trainer.flat_state)."""
        if not self._state_flat and any(o.state for o in self._inner_optimizers()):
            flatten_state(self._inner_optimizers())
            self._state_flat = True

    def onload(self) -> dict[str, float]:
        """Bring everything offload() moved back, bit-exact, into the same tensors."""
        if self._offloader is None or not self._offloader.offloaded:
            raise RuntimeError("MegatronBackend.onload: nothing is offloaded; call offload() first")
        return self._offloader.onload()

    @property
    def offloaded(self) -> bool:
        return self._offloader is not None and self._offloader.offloaded

    def _require_onloaded(self, what: str) -> None:
        if self._offloader is not None and self._offloader.offloaded:
            raise RuntimeError(f"MegatronBackend.{what}: trainer state is offloaded; call onload() first")

    # ---- weights out ------------------------------------------------------------------------
    def local_state(self) -> dict[str, torch.Tensor]:
        """This rank's Megatron tensors (live, detached), named as in naming.megatron_layout."""
        named = getattr(self, "_named_tensors", None)
        if named is None:  # the module's parameter and buffer objects, fixed for its life
            named = self._named_tensors = {k: v for k, v in self.model.module.state_dict(keep_vars=True).items()
                                           if not k.endswith("_extra_state")}
        return {k: v.detach() for k, v in named.items()}

    def export_shards(self):
        """(local tensors, Layout) of this rank, for the checkpoint engine's reshard planner.

        When offloaded, the tensors are views into the host copy (no onload, no clone)."""
        # every switch calls this: the layout (~0.02 s to build for k2-small, and its fingerprint
        # keys the update plan) is rebuilt only when something it is made from changed
        r = self.ranks
        key = (repr(self.config), r["tp"], r["ep"], r["tp_rank"], r["ep_rank"], self.dtype, self.use_te)
        cached = getattr(self, "_layout_cache", None)
        if cached is None or cached[0] != key:
            cached = self._layout_cache = (key, megatron_layout(self.config, r["tp"], r["ep"], r["tp_rank"],
                                                                r["ep_rank"], self.dtype, self.use_te))
        layout = cached[1]
        local = self.local_state()
        if self.offloaded:
            return {k: self._offloader.host_view(local[k]) for k in layout.tensors}, layout
        return {k: local[k] for k in layout.tensors}, layout

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The full HF state dict (every rank participates; all get it). Gathers over the world with
        all_gather_object: meant for small models and exports, the checkpoint engine does it at scale."""
        local = {k: v.cpu().clone() for k, v in self.local_state().items()}
        key = (self.ranks["tp_rank"], self.ranks["ep_rank"])
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (key, local))
        shards = dict(gathered)
        return megatron_to_hf(shards, self.config, self.ranks["tp"], self.ranks["ep"], self.use_te)

    def save_hf(self, path: str | os.PathLike, format: str = "native", extras_from: str | os.PathLike | None = None) -> None:
        """Write an HF checkpoint directory (rank 0 writes, atomically). format: native | bf16 | fp8-block128
        (k2sys.models.hf_io.export_state); extras_from: a checkpoint whose tokenizer / remote-code files travel."""
        from k2sys.models.hf_io import write_hf_dir

        state = self.hf_state_dict()
        if dist.get_rank() == 0:
            write_hf_dir(state, self.config, path, format=format, extras_from=extras_from)
        dist.barrier()

    # ---- resume checkpoints (dist_checkpointing) ----------------------------------------------
    def _sharded(self, optimizer: bool) -> dict[str, Any]:
        model_sd = self.model.module.sharded_state_dict()
        sd: dict[str, Any] = {"model": model_sd}
        if optimizer:
            sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, is_loading=False)
        return sd

    def save(self, path: str | os.PathLike) -> Path:
        """Model + optimizer + step as a megatron dist checkpoint (loadable at any TP/EP), atomically."""
        self._require_onloaded("save")
        try:
            import psutil  # noqa: F401
        except ImportError as e:  # megatron's writer processes die on it and the save hangs forever
            raise ImportError("MegatronBackend.save needs psutil (megatron dist_checkpointing writer): "
                              "pip install psutil") from e
        dst = Path(path)
        tmp = dst.with_name(f".{dst.name}.tmp")
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        with _writer_processes_die_with_us():
            dist_checkpointing.save(self._sharded(optimizer=True), str(tmp))
        from k2sys.coordinator.state import fault_point

        fault_point("ckpt_write")  # TEST HOOK (K2SYS_FAULT): shards written, meta and rename not yet
        dist.barrier()
        if dist.get_rank() == 0:
            train = asdict(self.train)
            write_json_atomic(tmp / META, {"format": FORMAT_DIST, "config": self.config.to_hf_dict(),
                                           "tp": self.ranks["tp"], "ep": self.ranks["ep"], "step": self.step,
                                           "train": train})
            if dst.exists():
                old = dst.with_name(f".{dst.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dst, old)
                os.replace(tmp, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dst)
        dist.barrier()
        return dst

    def load(self, path: str | os.PathLike, optimizer: bool = True) -> None:
        self._require_onloaded("load")
        meta = json.loads((Path(path) / META).read_text())
        sd = self._sharded(optimizer)
        if optimizer:
            sd["optimizer"] = self.optimizer.sharded_state_dict(sd["model"], is_loading=True)
        state = dist_checkpointing.load(sd, str(path))
        self.model.module.load_state_dict(state["model"], strict=False)
        self._module_tensors = self._named_tensors = None  # walked again (load_state_dict copies in place)
        if optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            self._state_flat = False  # the loaded state is fresh tensors: flattened again at the next offload
        self.step = int(meta.get("step", 0))
