"""Rollouts with K samples per prompt, a generation budget and partial rollouts.

    groups = resumed groups (from the RolloutBuffer) + new prompts x K
    -> one request per unfinished member: input_ids = prompt + response so far (a paused
       trajectory resumes from its prefix on the *current* weights)
    -> generate until `finish_fraction` of the requests finished or `max_seconds` passed,
       then pause(abort): the long tail comes back with its tokens so far
    -> groups whose K members all finished are scored (verifier, budget penalty) and trained on;
       the others go back to the buffer with per-token policy versions and an age.
Multi-turn episodes (tool use) ride along: each plays its environment turn by turn inside the same
budget; a pause stops them mid-turn or between turns, and they resume like any paused member.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from k2sys.config import ConfigError
from k2sys.coordinator.rl_batch import Sample
from k2sys.coordinator.state import fault_point
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams, fit_new_tokens
from k2sys.envs.agent_loop import AgentConfig, advance_episode, is_episode
from k2sys.rl.budget import BudgetController
from k2sys.rl.rollout_buffer import PartialTrajectory
from k2sys.tasks.base import Task, TaskFamily
from k2sys.tasks.format import prompt_ids, score_many


@dataclass(kw_only=True)
class RolloutConfig:
    prompts_per_iter: int = 32
    samples_per_prompt: int = 8
    """K in the K2 loss."""
    finish_fraction: float = 0.95
    """Pause the long tail once this share of the iteration's requests finished (1.0: never)."""
    max_seconds: float = 600.0
    """Generation budget in seconds per iteration; unfinished requests are paused after it."""
    max_age: int = 4
    """Drop a paused trajectory after this many resumptions."""
    top_p: float = 1.0

    def validate(self) -> None:
        if self.prompts_per_iter < 1 or self.samples_per_prompt < 1:
            raise ConfigError("rollout.prompts_per_iter and rollout.samples_per_prompt must be >= 1")
        if self.samples_per_prompt < 2:
            raise ConfigError("rollout.samples_per_prompt: the K2 loss needs >= 2 samples per prompt (group baseline)")
        if not 0 < self.finish_fraction <= 1:
            raise ConfigError(f"rollout.finish_fraction: must be in (0, 1], got {self.finish_fraction}")
        if self.max_seconds <= 0:
            raise ConfigError(f"rollout.max_seconds: must be > 0, got {self.max_seconds}")


@dataclass
class RolloutResult:
    samples: list[Sample]
    unfinished: list[PartialTrajectory]
    stats: dict[str, Any]


def new_group(task: Task, group_id: int, k: int, tokenizer: Any) -> list[PartialTrajectory]:
    p = prompt_ids(tokenizer, task)
    return [PartialTrajectory(uid=uuid.uuid4().hex, group_id=group_id, prompt_tokens=p,
                              meta={"task": task.to_dict(), "finished": False, "finish_reason": None,
                                    "group_size": k})
            for _ in range(k)]


async def _run_with_budget(engine: Any, jobs: list[Callable[[Callable[[], bool]], Any]], finish_fraction: float,
                           max_seconds: float, on_pause: Callable[[], None]) -> tuple[list, bool]:
    """Run every job (a coroutine factory taking a `stopping()` flag) until `finish_fraction` of them
    finished or `max_seconds` passed, then pause(abort) the engine: in-flight generations come
    back with their tokens so far and multi-turn episodes stop before their next turn.

    The first job that fails ends the rollout: the others are cancelled and awaited, and every
    exception is retrieved (a dead engine fails all requests at once: the caller gets one error,
    whose note counts the failed requests, not one "Task exception was never retrieved" traceback each)."""
    loop = asyncio.get_running_loop()
    state = {"paused": False}
    tasks = [asyncio.create_task(job(lambda: state["paused"])) for job in jobs]
    need = math.ceil(finish_fraction * len(tasks))
    deadline = loop.time() + max_seconds
    pending, n_done = set(tasks), 0
    try:
        while pending:
            timeout = 1.0 if state["paused"] else max(0.0, deadline - loop.time())
            done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            n_done += len(done)
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
            if done and not state.get("hooked"):
                state["hooked"] = True
                fault_point("rollout")  # TEST HOOK (K2SYS_FAULT), once per rollout: first requests done
            if not state["paused"] and pending and (n_done >= need or loop.time() >= deadline):
                state["paused"] = True
                await loop.run_in_executor(None, on_pause)
            elif state["paused"] and pending and not done:
                # a turn request that reached the engine after the pause waits there: abort it too
                await loop.run_in_executor(None, engine.abort, None)
    except BaseException as exc:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # wait for them; retrieves every exception
        failed = sum(1 for t in tasks if not t.cancelled() and t.exception() is not None)
        if isinstance(exc, Exception):
            exc.add_note(f"rollout: {failed} of {len(tasks)} requests failed, the rest were cancelled")
        raise
    return [t.result() for t in tasks], state["paused"]


def run_rollout(engine: Any, tokenizer: Any, families: dict[str, TaskFamily], groups: list[list[PartialTrajectory]],
                version: int, temperature: float, budget: BudgetController, cfg: RolloutConfig,
                stop_ids: list[int], pause: Callable[[], None], seed: int,
                agent: AgentConfig | None = None) -> RolloutResult:
    """Generate every unfinished member of `groups`; `pause()` is the coordinator's pause action.
    Single-turn members are one request each; multi-turn episodes (k2sys.envs.agent_loop, meta
    "env") play turn by turn against their environment within the same budget and pause."""
    t0 = time.perf_counter()

    def family(meta: dict) -> tuple[TaskFamily, Task]:
        task = Task.from_dict(meta["task"])
        if task.family not in families:
            raise ValueError(f"rollout: task family {task.family!r} is not configured; have {sorted(families)}")
        return families[task.family], task

    members = [m for g in groups for m in g if not m.meta["finished"]]
    singles = [m for m in members if not is_episode(m)]
    episodes = [m for m in members if is_episode(m)]
    jobs = []
    for i, m in enumerate(singles):
        _, task = family(m.meta)
        left = budget.max_new_tokens(task.family) - len(m.response_tokens)
        sp = SamplingParams(temperature=temperature, top_p=cfg.top_p,
                            max_new_tokens=fit_new_tokens(engine, len(m.context_tokens), left),
                            stop_token_ids=tuple(stop_ids), sampling_seed=seed * 100_003 + i)
        req = GenerateRequest(input_ids=tuple(m.context_tokens), sampling=sp, return_logprob=True)
        jobs.append(lambda stopping, req=req: engine.async_generate([req]))
    for i, m in enumerate(episodes):
        sp = SamplingParams(temperature=temperature, top_p=cfg.top_p, sampling_seed=seed * 100_003 + len(singles) + i)
        jobs.append(lambda stopping, m=m, sp=sp: advance_episode(
            engine, tokenizer, m, version=version, sampling=sp, cfg=agent or AgentConfig(), stop_ids=stop_ids,
            stopping=stopping))
    results, paused = asyncio.run(_run_with_budget(engine, jobs, cfg.finish_fraction, cfg.max_seconds, pause)) \
        if jobs else ([], False)
    if not paused:
        pause()  # nothing left in flight: the pause is a no-op on the engine, but the phase moves on
    outs = [r[0] for r in results[:len(singles)]]
    gen_tokens = sum(results[len(singles):])
    for m, out in zip(singles, outs):
        lps = list(out.output_logprobs or [0.0] * len(out.output_ids))
        m.extend(list(out.output_ids), lps, version)
        gen_tokens += len(out.output_ids)
        if out.finish_reason in ("stop", "length"):
            m.meta["finished"], m.meta["finish_reason"] = True, out.finish_reason

    samples: list[Sample] = []
    unfinished: list[PartialTrajectory] = []
    ages = []
    # single-turn rewards of every finished group, scored in one batch per family
    scored = [g for g in groups if all(m.meta["finished"] for m in g) and not is_episode(g[0])]
    flat = [(*family(g[0].meta), m.response_tokens, m.meta["finish_reason"]) for g in scored for m in g]
    flat_rewards = iter(score_many(flat, tokenizer, stop_ids))
    for g in groups:
        if not all(m.meta["finished"] for m in g):
            unfinished.extend(g)
            continue
        if is_episode(g[0]):  # the env's reward (judged at the episode's end); env turns masked out
            for m in g:
                ages.append(m.age)
                samples.append(Sample(group_id=m.group_id, family=m.meta["family"], prompt_tokens=m.prompt_tokens,
                                      response_tokens=m.response_tokens, logprobs=m.logprobs, versions=m.versions,
                                      reward=float(m.meta["reward"]), truncated=bool(m.meta["truncated"]),
                                      meta={"raw_reward": m.meta["reward"], "turns": len(m.meta["actions"]),
                                            "env_info": m.meta["env_info"]},
                                      response_mask=list(m.meta["response_mask"])))
            continue
        fam, task = family(g[0].meta)
        truncated = [m.meta["finish_reason"] == "length" for m in g]
        raw = [next(flat_rewards) for _ in g]
        rewards = budget.penalize(raw, truncated).tolist()
        for m, r, tr in zip(g, rewards, truncated):
            ages.append(m.age)
            samples.append(Sample(group_id=m.group_id, family=task.family, prompt_tokens=m.prompt_tokens,
                                  response_tokens=m.response_tokens, logprobs=m.logprobs, versions=m.versions,
                                  reward=float(r), truncated=tr, meta={"raw_reward": r if not tr else 0.0}))
    n_req = len(singles) + len(episodes)
    stats = {
        "requests": n_req, "paused_requests": sum(1 for o in outs if o.finish_reason == "abort")
        + sum(1 for m in episodes if not m.meta["finished"]),
        "generated_tokens": gen_tokens, "rollout_s": time.perf_counter() - t0,
        "gen_tok_per_s": gen_tokens / max(time.perf_counter() - t0, 1e-9),
        "groups_trained": len({s.group_id for s in samples}), "groups_deferred": len({m.group_id for m in unfinished}),
        "resumed_samples": sum(1 for s in samples if len(set(s.versions)) > 1),
        "max_age_trained": max(ages) if ages else 0,
        "truncated_fraction": sum(s.truncated for s in samples) / max(len(samples), 1),
        "temperature": temperature,
    }
    by_fam: dict[str, list[float]] = {}
    for s in samples:
        by_fam.setdefault(s.family, []).append(s.reward)
    for f, rs in by_fam.items():
        stats[f"reward/{f}"] = sum(rs) / len(rs)
    return RolloutResult(samples=samples, unfinished=unfinished, stats=stats)
