"""Config sections of the SFT -> RL recipe (k2sys.recipes composes them into RunConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from k2sys.config import ConfigError


@dataclass(kw_only=True)
class TasksSection:
    families: list[str] = field(default_factory=lambda: ["list_ops", "arithmetic"])
    params: dict = field(default_factory=lambda: {"list_ops": {"length": 3}, "arithmetic": {"digits": 1, "ops": "+"}})
    """Difficulty parameters per family (JSON object), passed to k2sys.tasks.get_family."""
    n_train: int = 1200
    """Train tasks per family (capped by how many distinct tasks the family has)."""
    n_heldout: int = 200
    tool_use: int = 0
    """Multi-turn tool-use tasks (k2sys.envs "tool_use"): judged synthetic trajectories for SFT and the
    same tasks as RL episodes played through the engine turn by turn; 0 = no agentic stage."""
    tool_use_heldout: int = 40
    """Held-out tool-use tasks for evaluation (greedy episodes, mean rubric score and pass rate)."""
    tool_use_failure_rate: float = 0.1
    """Share of valid tool calls that fail transiently (the agent must retry)."""
    tool_use_max_turns: int = 8
    code: int = 0
    """Coding problems (k2sys.envs "code"): reference programs for SFT, then RL episodes whose programs
    run in the bubblewrap sandbox, failures coming back as feedback turns; 0 = none."""
    code_heldout: int = 40
    code_max_turns: int = 3

    def validate(self) -> None:
        from k2sys.tasks import list_families

        for f in self.families:
            if f not in list_families():
                raise ConfigError(f"tasks.families: {f!r} is unknown; choose from {list_families()}")
        if self.n_train < 1 or self.n_heldout < 1:
            raise ConfigError("tasks.n_train and tasks.n_heldout must be >= 1")
        if min(self.tool_use, self.tool_use_heldout, self.code, self.code_heldout) < 0:
            raise ConfigError("tasks.tool_use, tool_use_heldout, code and code_heldout must be >= 0")
        if self.tool_use_max_turns < 1 or self.code_max_turns < 1:
            raise ConfigError("tasks.tool_use_max_turns and tasks.code_max_turns must be >= 1")
        if self.code:
            from k2sys.rewards.sandbox import bwrap_available

            ok, why = bwrap_available()
            if not ok:
                raise ConfigError(f"tasks.code: model-written programs run only in the bubblewrap sandbox: {why}; "
                                  "or set tasks.code=0")
        if not 0 <= self.tool_use_failure_rate < 1:
            raise ConfigError(f"tasks.tool_use_failure_rate: must be in [0, 1), got {self.tool_use_failure_rate}")

    def env_kinds(self) -> list[str]:
        """The multi-turn environment kinds this run trains on (k2sys.envs)."""
        return [k for k, n in (("tool_use", self.tool_use), ("code", self.code)) if n > 0]

    def env_specs(self, kind: str, split: str, seed: int) -> list[dict]:
        """Env specs of the train or held-out tasks of `kind` (held-out tasks come from another seed)."""
        from k2sys.envs import code_specs, tool_use_specs

        held = split != "train"
        s = seed + 1_000_003 if held else seed
        if kind == "tool_use":
            n = (self.tool_use_heldout if held else self.tool_use) if self.tool_use else 0
            return tool_use_specs(n, s, failure_rate=self.tool_use_failure_rate, max_turns=self.tool_use_max_turns)
        if kind == "code":
            n = (self.code_heldout if held else self.code) if self.code else 0
            return code_specs(n, s, max_turns=self.code_max_turns)
        raise ConfigError(f"tasks: no environment kind {kind!r}; have tool_use, code")


@dataclass(kw_only=True)
class DataSection:
    """The user's own data (k2sys.data.sources: JSONL, Parquet, or a `datasets` save_to_disk directory)."""

    rl_prompts: str | None = None
    """RL prompts; each row gives a prompt (prompt_key, or messages_key for a chat) and a label for the reward."""
    prompt_key: str = "prompt"
    label_key: str | None = "answer"
    """Column the reward checks against; none for rewards that need no label."""
    messages_key: str | None = None
    """Column holding the prompt as a chat message list (instead of prompt_key)."""
    split: str | None = None
    """Split of a DatasetDict directory (e.g. train)."""
    heldout: int = 32
    """Prompts held out of RL for evaluation before and after (chosen by a hash of the prompt)."""
    max_new_tokens: int = 64
    """Response token budget of the user prompts (rl.budgets['user'])."""
    sft: str | None = None
    """SFT conversations (messages_key rows) for an SFT stage before RL; sft.steps sets its length."""
    sft_messages_key: str = "messages"
    max_bad_fraction: float = 0.5
    """Bad rows are reported and skipped; a file with more than this share of bad rows stops the run."""

    def validate(self) -> None:
        if self.heldout < 0 or self.max_new_tokens < 1:
            raise ConfigError("data.heldout must be >= 0 and data.max_new_tokens >= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ConfigError(f"data.max_bad_fraction: must be in [0, 1], got {self.max_bad_fraction}")
        for key in ("rl_prompts", "sft"):
            v = getattr(self, key)
            if v is not None:
                from pathlib import Path

                if not Path(v).exists():
                    raise ConfigError(f"data.{key}: {v} does not exist")


@dataclass(kw_only=True)
class SFTSection:
    steps: int = 100
    rows_per_batch: int = 16
    """Packed rows per step (each seq_len tokens, several conversations per row)."""
    seq_len: int = 64
    lr: float = 2e-3
    optimizer: Literal["adamw", "muon"] = "adamw"
    checkpoint_every: int = 50

    def validate(self) -> None:
        if self.steps < 0 or self.rows_per_batch < 1 or self.seq_len < 8 or self.checkpoint_every < 1:
            raise ConfigError("sft: steps >= 0, rows_per_batch >= 1, seq_len >= 8, checkpoint_every >= 1")


@dataclass(kw_only=True)
class TrainerSection:
    tp: int = 1
    """Tensor parallel size of the Megatron trainer (ranks come from torchrun; dp = world / (tp*...))."""
    ep: int = 1
    """Expert parallel size."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Params dtype: auto = the checkpoint's torch_dtype on GPU, float32 on CPU (megatron's CPU path is fp32)."""
    moe_kernels: Literal["auto", "triton", "megatron"] = "auto"
    """Routed experts: k2sys' Triton fused MoE on CUDA (auto), always (triton), or megatron's own
    SequentialMLP (megatron). Same parameters and checkpoints either way."""

    def validate(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ConfigError("trainer.tp and trainer.ep must be >= 1")


@dataclass(kw_only=True)
class RLSection:
    iterations: int = 30
    tau: float = 0.1
    """K2 loss regulariser (the tau of the K1.5/K2 objective)."""
    lr: float = 5e-4
    optimizer: Literal["adamw", "muon"] = "adamw"
    inner_steps: int = 2
    """Optimizer steps per iteration on the same rollouts (pi_old stays the rollout policy)."""
    ptx_coef: float = 0.1
    """lambda: total = RL loss + lambda * CE on curated SFT rows."""
    ptx_rows: int = 16
    old_logprobs: Literal["trainer", "engine"] = "trainer"
    """pi_old from a trainer recompute, or the engine's sampling log-probs (valid at temperature 1 only)."""
    stale_mode: Literal["none", "mask", "importance"] = "mask"
    max_staleness: int = 1
    t_start: float = 1.0
    t_end: float = 0.8
    t_schedule: Literal["linear", "exponential", "cosine"] = "linear"
    episode_groups_per_iter: int = 4
    """Per environment kind (tasks.tool_use, tasks.code): episode groups added each iteration, each of
    K = rollout.samples_per_prompt episodes of one task."""
    budgets: dict = field(default_factory=lambda: {"list_ops": 8, "arithmetic": 4})
    """Max response tokens per task family (budget control)."""
    budget_penalty: float = 0.5
    filter_low: float = 0.0
    """Difficulty filter: keep train prompts with low <= pass@k <= high under the SFT model."""
    filter_high: float = 0.99
    """< 1 drops the prompts the SFT model always solves (no learning signal in a K2 group)."""
    filter_k: int = 1
    filter_samples: int = 4
    """Samples per prompt for the unbiased pass@k estimate (>= filter_k)."""
    filter_prompts: int = 400
    """Train prompts the pass@k difficulty filter samples before RL; 0 = no filter (every train prompt is used)."""
    mismatch_probe: int = 16
    """Prompts per iteration sampled at T=1 to compare engine and trainer log-probs."""

    def validate(self) -> None:
        if self.iterations < 0 or self.inner_steps < 1:
            raise ConfigError("rl.iterations must be >= 0 and rl.inner_steps >= 1")
        if not self.tau > 0:
            raise ConfigError(f"rl.tau: must be > 0, got {self.tau}")
        if self.ptx_coef < 0:
            raise ConfigError(f"rl.ptx_coef: must be >= 0, got {self.ptx_coef}")
        if self.old_logprobs == "engine" and (self.t_start != 1.0 or self.t_end != 1.0):
            raise ConfigError("rl.old_logprobs=engine: engine log-probs are of the tempered distribution; "
                              "use it with rl.t_start=1 and rl.t_end=1, or set rl.old_logprobs=trainer")
        if not 0 <= self.filter_low < self.filter_high <= 1:
            raise ConfigError("rl.filter_low/filter_high: need 0 <= low < high <= 1")
        if not 1 <= self.filter_k <= self.filter_samples:
            raise ConfigError(f"rl.filter_k: need 1 <= filter_k <= filter_samples={self.filter_samples}")


@dataclass(kw_only=True)
class EngineSection:
    kind: Literal["native", "sglang"] = "native"
    """native: `k2sys serve` (one device, CPU or GPU); sglang: `python -m sglang.launch_server` (GPU nodes)."""
    port: int = 0
    """0 picks a free port."""
    max_running_requests: int = 256
    restarts: int = 3
    """How many times a dead engine is restarted (and reloaded from the trainer) per run."""
    startup_timeout_s: float = 300.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Native engine device: auto = cuda when this process sees a GPU, else cpu."""
    moe_kernels: Literal["auto", "triton", "torch"] = "auto"
    """Native engine MoE layers: Triton router + fused MoE on CUDA (auto), always (triton), never (torch)."""
    quantization: Literal["none", "fp8"] = "none"
    """Inference weights: fp8 = FP8 e4m3 with 128x128 block scales (the paper's inference precision): the engine
    holds FP8 weights + scales and quantizes every trainer push once per bucket on arrival (k2sys.quant)."""
    tp: int = 1
    """engine.kind=sglang: the engine's tensor parallel size, independent of trainer.tp (each TP rank takes
    whole HF tensors and shards them itself). The native engine runs on one device: 1."""
    ep: int = 1
    """engine.kind=sglang: expert parallel size (divides engine.tp)."""
    dp: int = 1
    """engine.kind=sglang: data-parallel replicas (each engine.tp GPUs)."""
    mem_fraction_static: float | None = None
    """engine.kind=sglang: share of GPU memory for weights + KV cache (colocated: leave the trainer room);
    None = sglang's default."""
    memory_saver: bool = True
    """engine.kind=sglang: --enable-memory-saver, which release/resume_memory_occupation need (colocated)."""
    weight_sync: Literal["tensor", "distributed"] = "tensor"
    """engine.kind=sglang: tensor = /update_weights_from_tensor with flattened buckets (colocated; CUDA IPC on
    GPU); distributed = an NCCL group with the engine (/init_weights_update_group +
    /update_weights_from_distributed), for an engine on other GPUs or nodes."""
    sync_port: int = 0
    """weight_sync=distributed: the update group's TCP port on this host (0 picks a free one)."""
    update_bucket_mb: int = 256
    """Bucket size of a weight push to the engine (MiB): the memory a push holds in flight per bucket."""
    sglang_module: str = "sglang.launch_server"
    """The module `python -m` runs for engine.kind=sglang (tests point it at a stand-in taking the same args)."""

    def native_args(self) -> tuple[str, ...]:
        """`k2sys serve` flags for these settings (the native engine only)."""
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return ("--max-running-requests", str(self.max_running_requests), "--device", device,
                "--moe-kernels", self.moe_kernels, "--quantization", self.quantization)

    def validate(self) -> None:
        if min(self.tp, self.ep, self.dp) < 1:
            raise ConfigError(f"engine.tp/ep/dp: {self.tp}/{self.ep}/{self.dp} must be >= 1")
        if self.tp % self.ep:
            raise ConfigError(f"engine.ep={self.ep} must divide engine.tp={self.tp}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ConfigError(f"engine.mem_fraction_static: {self.mem_fraction_static} must be in (0, 1]")
        if self.update_bucket_mb < 1:
            raise ConfigError(f"engine.update_bucket_mb: {self.update_bucket_mb} must be >= 1")
        if not 0 <= self.sync_port < 65536:
            raise ConfigError(f"engine.sync_port: {self.sync_port} must be a TCP port (0 = pick a free one)")
        if self.kind == "native":
            if (self.tp, self.ep, self.dp) != (1, 1, 1):
                raise ConfigError(f"engine.tp/ep/dp={self.tp}/{self.ep}/{self.dp}: the native engine runs on one "
                                  "device; use engine.kind=sglang for a parallel engine, or set them to 1")
            if self.weight_sync != "tensor":
                raise ConfigError("engine.weight_sync=distributed is SGLang's NCCL path; the native engine takes "
                                  "pushes through shared memory / CUDA IPC (engine.weight_sync=tensor)")
        if self.kind == "sglang":
            import importlib.util

            if self.quantization != "none":
                raise ConfigError("engine.quantization=fp8 with engine.kind=sglang: the weight push to SGLang in FP8 "
                                  "is not implemented yet; use engine.kind=native or engine.quantization=none")
            if importlib.util.find_spec("sglang") is None:
                raise ConfigError("engine.kind=sglang: sglang is not installed (GPU nodes: pip install sglang==0.5.23)")
