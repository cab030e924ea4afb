"""Recipes: Python functions that return a full RunConfig. `k2sys run NAME --set a.b=c`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from k2sys.config import ConfigError, check_int, check_name, check_number, check_seed, check_writable_dir
from k2sys.coordinator.rollout import RolloutConfig
from k2sys.coordinator.sections import (DataSection, EngineSection, RLSection, SFTSection, TasksSection,
                                        TrainerSection)
from k2sys.envs.agent_loop import AgentConfig
from k2sys.eval.harness import EvalConfig


MAX_VOCAB = 1 << 22  # 4M ids: 25x Kimi-K2's 163840; beyond it the embedding alone outgrows any machine here


@dataclass(kw_only=True)
class ModelSection:
    path: str | None = None
    """An HF checkpoint directory to post-train (as released: bf16 or FP8 block-128, sharded, tokenizer.json or
    tiktoken.model, the checkpoint's chat template). None: a fresh `preset` model with a tokenizer trained here."""
    preset: Literal["k2-tiny", "k2-small", "kimi-k2"] = "k2-tiny"
    """Architecture preset from k2sys.models.PRESETS (when model.path is none)."""
    vocab_size: int | None = None
    """Override the preset's vocabulary (None: the tokenizer's size for trained tokenizers)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    """Initialisation seed."""

    def validate(self) -> None:
        if self.vocab_size is not None:
            check_int("model.vocab_size", self.vocab_size, 1, MAX_VOCAB, hint="or none for the tokenizer's size")
        check_seed("model.seed", self.seed)
        if self.path is not None:
            from pathlib import Path

            if not Path(self.path).is_dir():
                raise ConfigError(f"model.path: {self.path} is not a directory; give an HF checkpoint directory "
                                  "(config.json + safetensors), or none for a fresh model.preset")
            if not (Path(self.path) / "config.json").is_file():
                raise ConfigError(f"model.path: {self.path} is not an HF checkpoint directory (no config.json)")


@dataclass(kw_only=True)
class TokenizerSection:
    vocab_size: int = 2048
    """BPE vocabulary trained on the built-in corpus (k2sys.tokenizer.default_corpus)."""

    def validate(self) -> None:
        check_int("tokenizer.vocab_size", self.vocab_size, 300, MAX_VOCAB, hint="256 bytes + specials + merges")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"
    """Run name: outputs go to <output_root>/<name>/."""
    output_root: str = "runs"
    pipeline: Literal["model-roundtrip"] = "model-roundtrip"
    """Which pipeline `k2sys run` executes."""
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)

    def validate(self) -> None:
        if (not self.name or self.name != self.name.strip() or any(c in self.name for c in "/\\")
                or self.name in (".", "..") or len(self.name.encode()) > 200):
            raise ConfigError(f"name: must be a non-empty name of at most 200 bytes without '/', '\\' or "
                              f"surrounding spaces (not '.' or '..'), got {self.name!r}")
        check_writable_dir("output_root", self.output_root)


@dataclass(kw_only=True)
class RLRunConfig:
    """data -> SFT -> eval -> RL through the coordinator -> eval -> report (k2sys.coordinator.driver)."""
    name: str = "tiny-k2"
    output_root: str = "runs"
    pipeline: Literal["sft-rl"] = "sft-rl"
    seed: int = 0
    cpu_threads: int = 1
    """torch intra-op threads of the coordinator/trainer process on CPU. The engine server runs beside
    it; on a 2-core machine two processes with 2 OpenMP threads each thrash (measured: a k2-tiny SFT
    step 0.15 s with 1 thread, 8 s with 2 while the other core is busy)."""
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    trainer: TrainerSection = field(default_factory=lambda: TrainerSection(dtype="auto"))
    """The trainer's TrainerConfig + layout; this job trains in the checkpoint's dtype on GPU, float32 on CPU."""
    sft: SFTSection = field(default_factory=SFTSection)
    rl: RLSection = field(default_factory=RLSection)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineSection = field(default_factory=lambda: EngineSection(device="auto", max_running_requests=256))
    """The engine's EngineConfig + how it is run; this job's engine takes the GPU when there is one."""
    agent: AgentConfig = field(default_factory=AgentConfig)
    """Multi-turn episodes (tasks.tool_use / tasks.code > 0): per-turn and per-episode token caps."""
    data: DataSection = field(default_factory=DataSection)
    reward: str | None = None
    """Reward of data.rl_prompts: math | exact | code | instruction, a Python `module:function` or
    `path/to/file.py:function` (called as fn(prompt, response, label, metadata) -> float), or an HTTP(S)
    reward service URL (k2sys.rewards.registry). Failures score 0, are counted and never stop the run."""
    reward_options: dict = field(default_factory=dict)
    """Options of the reward (e.g. {"timeout_s": 10} for Python functions, {"batch_size": 64} for URLs)."""

    def validate(self) -> None:
        RunConfig.validate(self)  # same name and output_root rules
        check_seed("seed", self.seed)
        check_int("cpu_threads", self.cpu_threads, 1, 4096)
        # Sections defined beside the code that uses them (rollout, eval, agent) check their own core
        # rules; these are the values they accept that would fail later, mid-run.
        check_int("rollout.max_age", self.rollout.max_age, 1, hint="paused trajectories older than this are dropped")
        check_number("rollout.top_p", self.rollout.top_p, gt=0, le=1, hint="1.0 disables nucleus sampling")
        check_int("rollout.prompts_per_iter", self.rollout.prompts_per_iter, 1)
        check_int("rollout.samples_per_prompt", self.rollout.samples_per_prompt, 2)
        check_number("rollout.max_seconds", self.rollout.max_seconds, gt=0)
        check_int("eval.max_new_tokens", self.eval.max_new_tokens, 1)
        check_number("eval.temperature", self.eval.temperature, ge=0)
        check_seed("eval.seed", self.eval.seed)
        check_int("agent.max_turn_tokens", self.agent.max_turn_tokens, 1)
        check_int("agent.max_episode_tokens", self.agent.max_episode_tokens, 2)
        if self.reward is not None:
            check_name("reward", self.reward)
        if self.data.rl_prompts and not self.reward:
            raise ConfigError("reward: data.rl_prompts needs a reward, e.g. --set reward=math or reward=my_mod:score")
        if self.reward and not self.data.rl_prompts:
            raise ConfigError("data.rl_prompts: a reward is set but no prompt file; --set data.rl_prompts=FILE")
        if self.data.rl_prompts:
            self.rl.budgets.setdefault("user", self.data.max_new_tokens)
        if not (self.tasks.families or self.data.rl_prompts or self.tasks.env_kinds()):
            raise ConfigError("tasks.families: name at least one task family, or give your own prompts with "
                              "data.rl_prompts=FILE and reward=...")
        if self.rl.ptx_coef > 0 and not (self.tasks.families or self.data.sft or self.tasks.env_kinds()):
            raise ConfigError("rl.ptx_coef: the PTX loss needs SFT rows (data.sft=FILE); or set rl.ptx_coef=0")
        missing = [f for f in self.tasks.families if f not in self.rl.budgets]
        if missing:
            raise ConfigError(f"rl.budgets: no token budget for task families {missing}; "
                              f"add them, e.g. --set 'rl.budgets={{\"{missing[0]}\": 16}}'")


def tiny_k2() -> RLRunConfig:
    """The README's main job: SFT then RL of k2-tiny on list and arithmetic tasks, CPU, < 20 min."""
    return RLRunConfig(name="tiny-k2")


def tiny_k2_agent() -> RLRunConfig:
    """SFT on judged synthetic tool-use trajectories, reference programs and list tasks, then RL with
    multi-turn tool-use and coding episodes (k2sys.envs; programs run in the sandbox) beside
    single-turn tasks; k2-tiny on CPU."""

    return RLRunConfig(
        name="tiny-k2-agent",
        tasks=TasksSection(families=["list_ops"], params={"list_ops": {"length": 3}}, n_train=600, n_heldout=100,
                           tool_use=600, tool_use_heldout=40, code=400, code_heldout=40),
        sft=SFTSection(steps=200, rows_per_batch=8, seq_len=768, lr=2e-3),
        rl=RLSection(iterations=12, episode_groups_per_iter=4, budgets={"list_ops": 8}),
        rollout=RolloutConfig(prompts_per_iter=8, samples_per_prompt=4),
        eval=EvalConfig(n_tasks=100),
        agent=AgentConfig(max_turn_tokens=96, max_episode_tokens=1000),
    )


def custom() -> RLRunConfig:
    """Post-train your own model: model.path (an HF checkpoint as released), data.rl_prompts (JSONL, Parquet or a
    `datasets` directory) and reward (built-in, module:function or URL); optional data.sft for an SFT stage.
    k2sys run custom --set model.path=DIR data.rl_prompts=FILE reward=math"""
    return RLRunConfig(
        name="custom",
        tasks=TasksSection(families=[]),
        sft=SFTSection(steps=0),
        rl=RLSection(iterations=10, budgets={}, filter_prompts=0, ptx_coef=0.0),
        rollout=RolloutConfig(prompts_per_iter=8, samples_per_prompt=4),
    )


def tiny_model() -> RunConfig:
    """Build a k2-tiny model and tokenizer, save as HF, reload, check logits agree."""
    return RunConfig(name="tiny-model", model=ModelSection(preset="k2-tiny"))


def small_model() -> RunConfig:
    return RunConfig(name="small-model", model=ModelSection(preset="k2-small"), tokenizer=TokenizerSection(vocab_size=8192))


RECIPES: dict[str, Callable[[], RunConfig | RLRunConfig]] = {
    "tiny-k2": tiny_k2,
    "tiny-k2-agent": tiny_k2_agent,
    "custom": custom,
    "tiny-model": tiny_model,
    "small-model": small_model,
}


def get_recipe(name: str) -> RunConfig | RLRunConfig:
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r} is unknown; choose one of {', '.join(sorted(RECIPES))}")
    return RECIPES[name]()
