"""Config sections of the SFT -> RL recipe (k2sys.recipes composes them into RunConfig).

The engine and trainer sections are the components' own configs (EngineConfig, TrainerConfig) with the
job's deployment fields added: one definition, default and check of each field, and the component gets
its config whole (`EngineConfig.resolved()` -> `k2sys serve --config`; `TrainerSection.build()`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Literal

from k2sys.config import ConfigError, check_fraction, check_int, check_name, check_number, check_port
from k2sys.engine.core.config import EngineConfig, RequestError
from k2sys.trainer.config import OptimConfig, TrainerConfig


@dataclass(kw_only=True)
class TasksSection:
    families: list[str] = field(default_factory=lambda: ["list_ops", "arithmetic"])
    """Single-turn task families (k2sys.tasks): list_ops, arithmetic, countdown; instruction (IFEval-style
    constraints, hack-check, AutoIF), faithfulness (grounded answers), safety (attacks to refuse, evolving
    attack set), open_ended (rubric critic reward, pairwise; mixed with verifiable families in one batch).
    Each needs a token budget in rl.budgets; judges/critics are set in params (e.g. {"open_ended":
    {"critic": "policy", "refresh_every": 2}})."""
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
    tool_use_library: str = ""
    """A `k2sys synth` library directory: tool-use episodes take their tasks and tools from it (real MCP
    tools and simulated ones, judged by its rubric); empty = the built-in tool-use tasks."""
    code: int = 0
    """Coding problems (k2sys.envs "code"): reference programs for SFT, then RL episodes whose programs
    run in the bubblewrap sandbox, failures coming back as feedback turns; 0 = none."""
    code_heldout: int = 40
    code_max_turns: int = 3

    def validate(self) -> None:
        from k2sys.tasks import get_family, list_families

        for f in self.families:
            if f not in list_families():
                raise ConfigError(f"tasks.families: {f!r} is unknown; choose from {list_families()}")
        check_int("tasks.n_train", self.n_train, 1)
        check_int("tasks.n_heldout", self.n_heldout, 1)
        for name in ("tool_use", "tool_use_heldout", "code", "code_heldout"):
            check_int(f"tasks.{name}", getattr(self, name), 0)
        check_int("tasks.tool_use_max_turns", self.tool_use_max_turns, 1)
        check_int("tasks.code_max_turns", self.code_max_turns, 1)
        check_number("tasks.tool_use_failure_rate", self.tool_use_failure_rate, ge=0, lt=1)
        if self.tool_use_library and not os.path.isdir(self.tool_use_library):
            raise ConfigError(f"tasks.tool_use_library: {self.tool_use_library!r} is not a directory; give the "
                              "output directory of `k2sys synth tasks`, or leave it empty")
        for f in self.families:  # a family refuses bad difficulty params when built: build it now, not mid-run
            params = self.params.get(f, {})
            if not isinstance(params, dict):
                raise ConfigError(f"tasks.params.{f}: expected a JSON object of difficulty params, got {params!r}")
            try:
                get_family(f, **params)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"tasks.params.{f}: {params} is not accepted: {e}") from None
        if self.code:
            from k2sys.rewards.sandbox import bwrap_available

            ok, why = bwrap_available()
            if not ok:
                raise ConfigError(f"tasks.code: model-written programs run only in the bubblewrap sandbox: {why}; "
                                  "or set tasks.code=0")

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
            return tool_use_specs(n, s, failure_rate=self.tool_use_failure_rate, max_turns=self.tool_use_max_turns,
                                  library=self.tool_use_library or None, split="heldout" if held else "train")
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
    max_bad_fraction: float = 0.02
    """Every bad row is counted and reported (a summary per reason and the first line numbers, also in
    runs/<name>/data/*_report.json) and skipped; a file with more than this share of bad rows stops the
    run. Raise it only for data known to be that noisy."""

    def validate(self) -> None:
        check_int("data.heldout", self.heldout, 0)
        check_int("data.max_new_tokens", self.max_new_tokens, 1)
        check_fraction("data.max_bad_fraction", self.max_bad_fraction)
        check_name("data.prompt_key", self.prompt_key)
        check_name("data.sft_messages_key", self.sft_messages_key)
        for key in ("label_key", "messages_key", "split"):
            if getattr(self, key) is not None:
                check_name(f"data.{key}", getattr(self, key))
        for key in ("rl_prompts", "sft"):
            v = getattr(self, key)
            if v is not None:
                from pathlib import Path

                p = Path(v)
                if not p.exists():
                    raise ConfigError(f"data.{key}: {v} does not exist; give an existing JSONL/Parquet/Arrow "
                                      "file or `datasets` directory")
                if not os.access(p, os.R_OK) or (p.is_dir() and not os.access(p, os.X_OK)):
                    raise ConfigError(f"data.{key}: {v} is not readable (check its permissions)")
                from k2sys.data.sources import source_format

                try:  # the suffix or directory layout decides the reader: an unknown one fails now, not mid-run
                    source_format(p)
                except (OSError, ValueError) as e:
                    raise ConfigError(f"data.{key}: {e}") from None


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
        check_int("sft.steps", self.steps, 0)
        check_int("sft.rows_per_batch", self.rows_per_batch, 1)
        check_int("sft.seq_len", self.seq_len, 8)
        check_number("sft.lr", self.lr, gt=0, le=1, hint="learning rates above 1 only diverge")
        check_int("sft.checkpoint_every", self.checkpoint_every, 1)


def _renamed(e: ValueError, names: dict[str, str]) -> ConfigError:
    """A component's ValueError as a ConfigError naming the job's dotted field (TrainerConfig.x -> trainer.x)."""
    msg = str(e)
    for old, new in names.items():
        msg = msg.replace(old, new)
    return ConfigError(msg)


@dataclass(kw_only=True)
class TrainerSection(TrainerConfig):
    """The job's trainer: the Megatron trainer's own TrainerConfig (k2sys.trainer.config: dtype, moe_kernels,
    micro_batch_size, bias_update_rate, recompute, optim.*) plus its parallel layout. optim.name and optim.lr
    are per stage (sft.optimizer / sft.lr, rl.optimizer / rl.lr); the other optim fields hold for both.
    `build()` is the one place a stage's TrainerConfig is made."""
    tp: int = 1
    """Tensor parallel size of the Megatron trainer (ranks come from torchrun; dp = world / (tp*...))."""
    ep: int = 1
    """Expert parallel size."""

    def build(self, optimizer: str, lr: float) -> TrainerConfig:
        """The TrainerConfig of a stage: these fields, dtype=auto decided, the stage's optimizer and lr."""
        return replace(self.resolved(), optim=replace(self.optim, name=optimizer, lr=lr))

    def parallel(self):
        from k2sys.trainer.parallel import ParallelConfig

        return ParallelConfig(tp=self.tp, ep=self.ep)

    def validate(self) -> None:
        check_int("trainer.tp", self.tp, 1)
        check_int("trainer.ep", self.ep, 1)
        default = OptimConfig()
        for name, where in (("name", "sft.optimizer and rl.optimizer"), ("lr", "sft.lr and rl.lr")):
            if getattr(self.optim, name) != getattr(default, name):
                raise ConfigError(f"trainer.optim.{name}: set per stage by {where}; leave trainer.optim.{name} "
                                  f"at {getattr(default, name)!r}")
        try:
            TrainerConfig.validate(self)
        except ValueError as e:
            raise _renamed(e, {"TrainerConfig.": "trainer.", "OptimConfig.": "trainer.optim."}) from None


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
    critic_coef: float = 0.1
    """Weight of the policy critic's refresh rows (open_ended with critic "policy" and refresh_every > 0:
    verdict-labelled critic prompts of verifiable pairs): total += critic_coef * CE on their verdict tokens,
    normalised over those rows alone, independent of ptx_coef; 0 = the critic is not trained (its scale
    is still calibrated)."""
    old_logprobs: Literal["trainer", "engine"] = "trainer"
    """pi_old from a trainer recompute, or the engine's sampling log-probs (valid at temperature 1 only)."""
    stale_mode: Literal["none", "mask"] = "mask"
    """How tokens sampled by an older policy (resumed partial rollouts) enter the loss: mask drops those more
    than max_staleness versions behind; none uses them as if on-policy. (k2sys.rl.losses also has an
    importance-weighting mode, but the RL loop does not yet give it the per-token behaviour and pi_old
    log-probs it needs, so it is not offered here.)"""
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
        check_int("rl.iterations", self.iterations, 0)
        check_number("rl.tau", self.tau, gt=0)
        check_number("rl.lr", self.lr, gt=0, le=1, hint="learning rates above 1 only diverge")
        check_int("rl.inner_steps", self.inner_steps, 1)
        check_number("rl.ptx_coef", self.ptx_coef, ge=0)
        check_int("rl.ptx_rows", self.ptx_rows, 0)
        check_number("rl.critic_coef", self.critic_coef, ge=0, hint="0 leaves the policy critic untrained")
        if self.ptx_coef > 0 and self.ptx_rows < 1:
            raise ConfigError("rl.ptx_rows: the PTX loss (rl.ptx_coef > 0) needs rl.ptx_rows >= 1; "
                              "or set rl.ptx_coef=0")
        check_int("rl.max_staleness", self.max_staleness, 0)
        check_number("rl.t_start", self.t_start, gt=0)
        check_number("rl.t_end", self.t_end, gt=0)
        check_int("rl.episode_groups_per_iter", self.episode_groups_per_iter, 0)
        if not isinstance(self.budgets, dict):
            raise ConfigError(f"rl.budgets: expected a JSON object of family -> max response tokens, "
                              f"got {self.budgets!r}")
        for fam, b in self.budgets.items():
            check_int(f"rl.budgets.{fam}", b, 1, hint="a token budget is a positive int")
        check_number("rl.budget_penalty", self.budget_penalty, ge=0)
        check_int("rl.filter_k", self.filter_k, 1)
        check_int("rl.filter_samples", self.filter_samples, 1)
        check_int("rl.filter_prompts", self.filter_prompts, 0)
        check_int("rl.mismatch_probe", self.mismatch_probe, 0)
        check_number("rl.filter_low", self.filter_low, ge=0, le=1)
        check_number("rl.filter_high", self.filter_high, ge=0, le=1)
        if self.old_logprobs == "engine" and (self.t_start != 1.0 or self.t_end != 1.0):
            raise ConfigError("rl.old_logprobs=engine: engine log-probs are of the tempered distribution; "
                              "use it with rl.t_start=1 and rl.t_end=1, or set rl.old_logprobs=trainer")
        if not 0 <= self.filter_low < self.filter_high <= 1:
            raise ConfigError("rl.filter_low/filter_high: need 0 <= low < high <= 1")
        if not 1 <= self.filter_k <= self.filter_samples:
            raise ConfigError(f"rl.filter_k: need 1 <= filter_k <= filter_samples={self.filter_samples}")


# EngineConfig fields only the native engine reads: set with engine.kind=sglang they would be ignored
_NATIVE_ONLY = ("block_size", "max_total_tokens", "max_num_batched_tokens", "max_model_len", "served_model_name",
                "cpu_threads", "enable_prefix_caching", "moe_kernels")


@dataclass(kw_only=True)
class EngineSection(EngineConfig):
    """The job's engine: the native engine's own EngineConfig (k2sys.engine.core.config: device,
    max_running_requests, max_total_tokens, block_size, moe_kernels, quantization, ...), handed whole to
    `k2sys serve --config`, plus how the coordinator runs it. engine.dtype stays none: the engine computes
    in the trainer's dtype (trainer.dtype), so pushed weights land without a cast."""
    kind: Literal["native", "sglang"] = "native"
    """native: `k2sys serve` (one device, CPU or GPU); sglang: `python -m sglang.launch_server` (GPU nodes)."""
    port: int = 0
    """0 picks a free port."""
    restarts: int = 3
    """How many times a dead engine is restarted (and reloaded from the trainer) per run."""
    startup_timeout_s: float = 300.0
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

    def validate(self) -> None:
        try:
            EngineConfig.validate(self, "engine")
        except RequestError as e:
            raise ConfigError(str(e)) from None
        if self.dtype is not None:
            raise ConfigError(f"engine.dtype={self.dtype}: the engine computes in the trainer's dtype so pushed "
                              "weights land without a cast; set trainer.dtype instead and leave engine.dtype=none")
        for name in ("tp", "ep", "dp"):
            check_int(f"engine.{name}", getattr(self, name), 1)
        if self.tp % self.ep:
            raise ConfigError(f"engine.ep={self.ep} must divide engine.tp={self.tp}")
        check_port("engine.port", self.port)
        check_port("engine.sync_port", self.sync_port)
        if self.port and self.port == self.sync_port:
            raise ConfigError(f"engine.sync_port: {self.sync_port} is also engine.port; use another port or 0")
        check_int("engine.restarts", self.restarts, 0)
        check_number("engine.startup_timeout_s", self.startup_timeout_s, gt=0)
        if self.mem_fraction_static is not None:
            check_number("engine.mem_fraction_static", self.mem_fraction_static, gt=0, le=1)
        check_int("engine.update_bucket_mb", self.update_bucket_mb, 1, 1 << 20)
        if self.kind == "native" and self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"engine.device={self.device}: this process sees no CUDA device; use "
                                  "engine.device=auto or cpu")
        if not all(part.isidentifier() for part in self.sglang_module.split(".")):
            raise ConfigError(f"engine.sglang_module: {self.sglang_module!r} is not a module name "
                              "(dotted identifiers, e.g. sglang.launch_server)")
        if self.kind == "native":
            if (self.tp, self.ep, self.dp) != (1, 1, 1):
                raise ConfigError(f"engine.tp/ep/dp={self.tp}/{self.ep}/{self.dp}: the native engine runs on one "
                                  "device; use engine.kind=sglang for a parallel engine, or set them to 1")
            if self.weight_sync != "tensor":
                raise ConfigError("engine.weight_sync=distributed is SGLang's NCCL path; the native engine takes "
                                  "pushes through shared memory / CUDA IPC (engine.weight_sync=tensor)")
        if self.kind == "sglang":
            import importlib.util

            default = EngineConfig()
            for name in _NATIVE_ONLY:
                if getattr(self, name) != getattr(default, name):
                    raise ConfigError(f"engine.{name}: only the native engine reads it (engine.kind=sglang takes "
                                      f"tp/ep/dp/mem_fraction_static/max_running_requests); leave it at "
                                      f"{getattr(default, name)!r} or use engine.kind=native")
            if self.quantization != "none":
                raise ConfigError("engine.quantization=fp8 with engine.kind=sglang: the weight push to SGLang in FP8 "
                                  "is not implemented yet; use engine.kind=native or engine.quantization=none")
            if importlib.util.find_spec("sglang") is None:
                raise ConfigError("engine.kind=sglang: sglang is not installed (GPU nodes: pip install sglang==0.5.23)")
