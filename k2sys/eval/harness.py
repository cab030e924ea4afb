"""Held-out evaluation through the InferenceEngine protocol (native engine or SGLang).

For each family: k samples per held-out task at `temperature` (greedy when 0, then k is 1):
  accuracy = avg@k (mean reward over all samples), pass@j for j in {1, k} = the unbiased estimator
  (k2sys.eval.passk; with j = k it is the share of tasks solved by any of the k samples).
The Kimi-K2 report uses avg@k for high-variance benchmarks; the recipe reports both.
Multi-turn environments (`evaluate_episodes`): one greedy episode per held-out env spec through
the same token-level agent loop RL uses; accuracy = mean env reward, pass@1 = share of episodes
with full reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from k2sys.config import ConfigError
from k2sys.eval.passk import count_correct, pass_at_k
from k2sys.tasks.base import Task, TaskFamily


@dataclass(kw_only=True)
class EvalConfig:
    n_tasks: int = 200
    """Held-out tasks per family."""
    k: int = 1
    """Samples per task (avg@k / pass@k); forced to 1 for greedy decoding."""
    temperature: float = 0.0
    max_new_tokens: int = 16
    seed: int = 1234

    def validate(self) -> None:
        if self.n_tasks < 1:
            raise ConfigError(f"eval.n_tasks: must be >= 1, got {self.n_tasks}")
        if self.k < 1:
            raise ConfigError(f"eval.k: must be >= 1, got {self.k}")
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature: must be >= 0, got {self.temperature}")


def evaluate(engine: Any, tokenizer: Any, families: dict[str, tuple[TaskFamily, list[Task]]],
             cfg: EvalConfig) -> dict[str, dict]:
    """Held-out tasks of each family through an InferenceEngine: {family: {"accuracy", "avg@k", "pass@1",
    "pass@k", "n", "k", "temperature"}}. Public benchmark files: k2sys.eval.suite.run_suite."""
    from k2sys.engine.protocol import GenerateRequest, SamplingParams
    from k2sys.tasks.format import prompt_ids, score_many, stop_token_ids

    stops = stop_token_ids(tokenizer)
    k = 1 if cfg.temperature == 0 else cfg.k
    reqs, index = [], []
    for name, (fam, tasks) in families.items():
        for ti, task in enumerate(tasks[: cfg.n_tasks]):
            for j in range(k):
                sp = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                    stop_token_ids=tuple(stops), seed=cfg.seed + 7919 * ti + j)
                reqs.append(GenerateRequest(input_ids=tuple(prompt_ids(tokenizer, task)), sampling=sp))
                index.append((name, ti))
    outs = engine.generate(reqs)
    per: dict[str, dict[int, list[float]]] = {n: {} for n in families}
    rewards = score_many([(families[name][0], families[name][1][ti], out.output_ids, out.finish_reason)
                          for (name, ti), out in zip(index, outs)], tokenizer, stops)
    for (name, ti), r in zip(index, rewards):
        per[name].setdefault(ti, []).append(r)
    report = {}
    for name, by_task in per.items():
        rewards = [r for rs in by_task.values() for r in rs]
        acc = sum(rewards) / max(len(rewards), 1)
        report[name] = {"accuracy": acc, f"avg@{k}": acc}
        for j in sorted({1, k}):
            report[name][f"pass@{j}"] = (sum(pass_at_k(len(rs), count_correct(rs), j) for rs in by_task.values())
                                         / max(len(by_task), 1))
        report[name].update(n=len(by_task), k=k, temperature=cfg.temperature)
    return report


def evaluate_episodes(engine: Any, tokenizer: Any, specs: list[dict], agent: Any, seed: int = 0,
                      temperature: float = 0.0) -> dict:
    """Greedy (by default) episodes of each env spec; see the module doc for the figures."""
    import asyncio

    from k2sys.envs.agent_loop import new_episode_group, run_episodes
    from k2sys.tasks.format import stop_token_ids

    trajs = [new_episode_group(spec, i, 1, tokenizer, seed=seed + i)[0] for i, spec in enumerate(specs)]
    asyncio.run(run_episodes(engine, tokenizer, trajs, version=0, temperature=temperature, top_p=1.0, cfg=agent,
                             stop_ids=stop_token_ids(tokenizer), seed=seed))
    rewards = [float(t.meta["reward"]) for t in trajs]
    n = max(len(trajs), 1)
    return {"accuracy": sum(rewards) / n, "pass@1": sum(r >= 1.0 for r in rewards) / n, "n": len(trajs), "k": 1,
            "temperature": temperature, "mean_turns": sum(len(t.meta["actions"]) for t in trajs) / n,
            "truncated": sum(bool(t.meta["truncated"]) for t in trajs) / n}
