"""The recipe's held-out evaluation, through the benchmark harness (k2sys.eval.suite.run_families): the same
outcome tables, avg@k / unbiased pass@k (k2sys.eval.passk) and results file as `k2sys eval`.

    held-out tasks of each generated family (TaskFamilyAdapter,   k samples per task through the engine at
    k2sys.eval.heldout)                                           the token level, the prompts RL sees,
                                                                  scored by the family's own verifier; a
                                                                  response cut before its stop token scores 0
    held-out env specs of each kind: tool_use, code (EnvAdapter)  k episodes per spec through the agent loop
                                                                  RL plays (EngineChatGenerator.play_episodes)
    -> run_families -> results (schema k2sys.eval/1: <run>/eval/<tag>/results.json + samples.jsonl, so
       `k2sys eval compare <run>/eval/sft <run>/eval/rl` compares them with confidence intervals)
    -> recipe_summary: {family: {"accuracy" (= avg@k), "avg@k", "pass@1", "pass@k", "n", "k", "temperature",
       family figures (instruction: prompt_strict, inst_strict; episodes: mean_turns, truncated)}}

Greedy decoding (temperature 0) forces k = 1: accuracy is then the share of tasks solved (for the
instruction family: IFEval's prompt-level strict accuracy over the generated constraints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from k2sys.config import ConfigError

if TYPE_CHECKING:
    from k2sys.eval.suite import SamplingConfig
    from k2sys.tasks.base import Task, TaskFamily

__all__ = ["EvalConfig", "evaluate_heldout", "recipe_summary", "sampling_config"]


@dataclass(kw_only=True)
class EvalConfig:
    n_tasks: int = 200
    """Held-out tasks per family."""
    k: int = 1
    """Samples per task (avg@k / pass@k); forced to 1 for greedy decoding."""
    temperature: float = 0.0
    max_new_tokens: int = 16
    """Response cap; a family's rl.budgets entry raises it for that family (its answers must fit), and
    episodes use agent.max_turn_tokens per turn."""
    seed: int = 1234

    def validate(self) -> None:
        if self.n_tasks < 1:
            raise ConfigError(f"eval.n_tasks: must be >= 1, got {self.n_tasks}")
        if self.k < 1:
            raise ConfigError(f"eval.k: must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature: must be >= 0, got {self.temperature}")


def sampling_config(cfg: EvalConfig) -> "SamplingConfig":
    """The harness's sampling settings of an EvalConfig: n = k (1 when greedy), pass@1 and pass@k."""
    from k2sys.eval.suite import SamplingConfig

    n = 1 if cfg.temperature == 0 else cfg.k
    return SamplingConfig(n=n, temperature=cfg.temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed,
                          ks=tuple(sorted({1, n})))


def evaluate_heldout(engine: Any, tokenizer: Any, families: Mapping[str, tuple["TaskFamily", list["Task"]]],
                     envs: Mapping[str, list[dict]], cfg: EvalConfig, *, agent: Any = None,
                     budgets: Mapping[str, int] | None = None, out_dir: str | Path | None = None, model: str = "",
                     log: Callable[[str], None] = lambda s: None) -> dict:
    """The held-out tasks (first cfg.n_tasks of each family) and env specs through `engine` (an
    InferenceEngine or its HTTP client): the harness's results dict; see the module doc."""
    # the harness (adapters, sympy) loads here, not with the recipe config that imports EvalConfig
    from k2sys.eval.generators import EngineChatGenerator
    from k2sys.eval.heldout import EnvAdapter, TaskFamilyAdapter
    from k2sys.eval.suite import FamilyRun, run_families

    cfg.validate()
    sampling = sampling_config(cfg)
    runs = []
    for name, (fam, tasks) in families.items():
        ad = TaskFamilyAdapter(fam)
        cap = max(cfg.max_new_tokens, int((budgets or {}).get(name, 0)))
        runs.append(FamilyRun(family=name, adapter=ad, items=ad.items(list(tasks)[: cfg.n_tasks]), path="heldout",
                              max_tokens=cap))
    for kind, specs in envs.items():
        ad = EnvAdapter(kind)
        runs.append(FamilyRun(family=kind, adapter=ad, items=ad.items(list(specs)), path="heldout",
                              max_tokens=agent.max_turn_tokens if agent is not None else None))
    gen = EngineChatGenerator(engine, tokenizer, raw_text=True, agent=agent)
    return run_families(gen, runs, sampling, model=model, out_dir=out_dir, log=log)


def recipe_summary(results: dict) -> dict[str, dict]:
    """{family: {"accuracy", "avg@k", "pass@1", "pass@k", "n", "k", "temperature", family figures}} of a
    results dict: the form the recipe keeps in state.json and logs as eval/<tag>/<family>/<metric>."""
    k = results["sampling"]["n"]
    out = {}
    for name, fam in results["families"].items():
        m = dict(fam["metrics"])
        acc = m.pop(f"avg@{k}")
        row = {"accuracy": acc, f"avg@{k}": acc}
        for j in sorted({1, k}):
            row[f"pass@{j}"] = m.pop(f"pass@{j}")
        if "turns" in m:  # episodes
            row["mean_turns"] = m.pop("turns")
        row.update(m)
        row.update(n=fam["n_tasks"], k=k, temperature=results["sampling"]["temperature"])
        out[name] = row
    return out
