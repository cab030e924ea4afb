"""The RL stage: one iteration of the paper's loop (section 5) per call of `RLLoop.iteration`.

    groups   <- paused groups of the last iteration + new prompts (+ evolved attacks, + episodes)
    rollout  <- the engine owns the device; long tails are paused at the end (partial rollouts)
    switch   -> release engine memory, onload trainer
    train    <- K2 + PTX loss steps on the rollout (reward hooks: critic refresh, attack set)
    save     -> the trainer checkpoint of iteration it+1 (the resume point once committed)
    switch   -> offload trainer, resume engine weights, checkpoint-engine push, resume KV cache
    commit   -> buffer + metrics + pointer: iteration, checkpoint and buffer become one resume point

Ownership transitions are k2sys.coordinator.state's OwnershipMachine (illegal orders raise); the
switch actions below return what each moved, which the machine records per iteration.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import Any, Callable

import torch

from k2sys.coordinator import state as sm
from k2sys.coordinator.rl_batch import Sample, build_rl_batch, set_old_logprobs
from k2sys.coordinator.rollout import new_group, run_rollout
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams
from k2sys.envs.agent_loop import new_episode_group
from k2sys.rewards import gym as reward_gym
from k2sys.rl import (BudgetConfig, BudgetController, K2PTXLoss, RolloutBuffer, StalePolicyConfig,
                      TemperatureSchedule, logprob_mismatch)
from k2sys.tasks import Task
from k2sys.tasks.format import prompt_ids, stop_token_ids
from k2sys.tokenizer import tokenize_chat

log = logging.getLogger("k2sys.coordinator")


class RLLoop:
    """Rank 0's RL loop over a trainer group and an engine. `runner` is the recipe (RecipeRunner):
    config, run directory, tokenizer, task families, metrics, state, engine handle and trainer group."""

    def __init__(self, runner: Any, prompts: list[Task], it: int, buffer: RolloutBuffer):
        self.run, self.prompts, self.buffer = runner, prompts, buffer
        cfg, r = runner.cfg, runner.cfg.rl
        self.cfg, self.r = cfg, r
        self.tg, self.ckpts = runner.tg, runner.rl_ckpts
        self.machine = sm.OwnershipMachine(sm.Phase.READY, memory_probe=self.memory_probe)
        self.budget = BudgetController(BudgetConfig(budgets=dict(r.budgets), penalty=r.budget_penalty))
        self.temps = TemperatureSchedule(t_start=r.t_start, t_end=r.t_end, total_steps=max(r.iterations - 1, 1),
                                         kind=r.t_schedule)
        self.stale = StalePolicyConfig(mode=r.stale_mode, max_staleness=r.max_staleness)
        self.stops = stop_token_ids(runner.tok)
        self.pad = runner.tok.token_to_id("[PAD]") or 0
        self.ptx_pool = ptx_pool(runner.dir / "data" / "sft.jsonl", runner.tok)
        self.loss_fn = K2PTXLoss(r.tau)
        self.rng = random.Random(cfg.seed * 7 + it)
        self.env_specs = {k: cfg.tasks.env_specs(k, "train", cfg.seed) for k in cfg.tasks.env_kinds()}

    # ---- one iteration -----------------------------------------------------------------------
    def iteration(self, it: int) -> dict:
        """Iteration it -> it + 1 (policy version it), committed on return; returns its metrics."""
        t0, m = time.perf_counter(), self.machine
        groups = self.make_groups(it)
        ro, probe = self.rollout(it, groups)
        m.do("release_engine", self.release_engine)
        m.do("onload_trainer", self.onload)
        stats: dict = {}
        m.do("train", lambda: self.train(it, groups, ro, probe, stats))
        self.tg.call("save", self.ckpts.dir_for(it + 1))  # the resume point once the pointer names it (commit)
        sm.fault_point("rl_saved")  # TEST HOOK (K2SYS_FAULT)
        m.do("offload_trainer", self.offload)
        m.do("resume_weights", lambda: self.run.engine.client.resume_memory(["weights"]))
        m.do("update_weights", lambda: self.push(str(it + 1)))  # each trainer rank sends from its host copy
        m.do("resume_kv", self.resume_kv)
        return self.commit(it + 1, ro, stats, t0)

    def make_groups(self, it: int) -> list:
        """Paused groups first (they resume on the new weights), then this iteration's new groups."""
        n = self.cfg.rollout.samples_per_prompt
        tok = self.run.tok
        groups = _regroup(self.buffer.take())
        for j, task in enumerate(self.rng.sample(self.prompts, min(self.cfg.rollout.prompts_per_iter,
                                                                   len(self.prompts)))):
            groups.append(new_group(task, it * 100_000 + j, n, tok))
        for j, task in enumerate(reward_gym.iteration_tasks(self.run.families, it, self.cfg.seed)):  # evolved attacks
            groups.append(new_group(task, it * 100_000 + 90_000 + j, n, tok))
        for ki, (kind, specs) in enumerate(self.env_specs.items()):
            for j, spec in enumerate(self.rng.sample(specs, min(self.r.episode_groups_per_iter, len(specs)))):
                gid = it * 100_000 + 50_000 + 1000 * ki + j
                groups.append(new_episode_group(spec, gid, n, tok, seed=gid, family=kind))
        return groups

    def rollout(self, it: int, groups: list) -> tuple[Any, Any]:
        """The engine serves this iteration's groups and pauses the long tails. If it dies meanwhile, a
        fresh one (restarted from the trainer's host copy) redoes the rollout; the trainer never restarts."""
        temperature = self.temps(it)

        def attempt():
            self.run.ensure_engine()
            self.machine.do("continue", self.run.engine.client.continue_generation)
            probe = self.probe_prompts()  # while the engine serves (before the pause)
            ro = run_rollout(self.run.engine.client, self.run.tok, self.run.families, groups, it, temperature,
                             self.budget, self.cfg.rollout, self.stops, pause=lambda: self.machine.do("pause", self.pause),
                             seed=it, agent=self.cfg.agent)
            return ro, probe

        return self.run.engine_call(attempt, what=f"rollout of iteration {it + 1}",
                                    on_restart=lambda: self.machine.reset(sm.Phase.READY))

    def train(self, it: int, groups: list, ro: Any, probe: Any, stats: dict) -> sm.StepResult:
        """K2 + PTX loss steps on the rollout (version it), after the families' reward hooks."""
        r = self.r
        hook_stats, hook_rows = rollout_hooks(self.run.families, self.run.tok, self.tg.call, it, groups, ro.samples,
                                              self.pad, self.stops)
        ptx = self.rng.sample(self.ptx_pool, r.ptx_rows) if r.ptx_coef > 0 else None
        critic = hook_rows if r.critic_coef > 0 else None  # weighed on their own, not by ptx_coef
        if hook_rows and critic is None:
            log.warning("rl.critic_coef=0: %d critic training rows of this iteration are not trained on", len(hook_rows))
        batch, bstats = build_rl_batch(ro.samples, self.pad, it, self.stale, ptx, r.ptx_coef,
                                       critic_rows=critic, critic_coef=r.critic_coef)
        stats.update(hook_stats)
        trainer_lp = self.tg.call("logprobs", batch)
        n_rl = bstats["samples"]
        mm = logprob_mismatch(batch["behaviour_lp"][:n_rl], trainer_lp[:n_rl], batch["loss_mask"][:n_rl]) \
            if self.temps(it) == 1.0 else None
        if r.old_logprobs == "trainer":
            set_old_logprobs(batch, trainer_lp)
        if probe is not None:  # before the step: engine and trainer must hold the same weights
            stats.update(self.mismatch_probe(probe))
        losses = [self.tg.call("train_step", batch, self.loss_fn) for _ in range(r.inner_steps)]
        stats.update(bstats, loss=losses[-1].loss, loss_first=losses[0].loss, grad_norm=losses[-1].grad_norm)
        if mm is not None:
            stats.update({f"mismatch/{k}": v for k, v in mm.items()})
        return sm.StepResult()

    def commit(self, it: int, ro: Any, stats: dict, t0: float) -> dict:
        """Buffer, metrics, then the pointer: iteration `it`, its checkpoint and buffer become the resume point."""
        self.buffer.put(ro.unfinished)
        self.buffer.path = self.ckpts.dir_for(it) / "rollout_buffer.json"
        self.buffer.commit(it)
        recs = self.machine.drain_records()
        metrics, trainer = self.run.metrics, self.run.trainer
        for rec in recs:
            a = rec["action"]
            extra = {f"{a}_{k}": v for k, v in rec["extra"].items() if isinstance(v, (int, float))}
            metrics.log("switch", it, **{f"{a}_s": rec["seconds"], f"{a}_bytes": rec["bytes_moved"],
                                         f"{a}_engine_mem": rec["engine_device_bytes"] or 0,
                                         f"{a}_trainer_mem": rec["trainer_device_bytes"] or 0}, **extra)
        rec = {**ro.stats, **stats, **sm.summarize(recs), **reward_stats(self.run.families),
               "buffer_size": len(self.buffer), "iter_s": time.perf_counter() - t0, "trainer_step": trainer.step,
               **self.buffer.last_stats.as_dict()}
        metrics.log("rl", it, **rec)
        sm.fault_point("rl_commit")  # TEST HOOK (K2SYS_FAULT): saved, pushed, logged, not committed
        self.ckpts.commit(it, trainer_step=trainer.step, buffer="rollout_buffer.json", buffered=len(self.buffer))
        self.run.save_state(rl_iter=it, rl_trainer_step=trainer.step)
        rec.setdefault("reward_mean", sum(s.reward for s in ro.samples) / max(len(ro.samples), 1))
        return rec

    # ---- switch actions (each returns what it moved, for the machine's records) --------------
    def memory_probe(self) -> tuple[int | None, int | None]:
        """(engine, trainer) device bytes after each switch: the engine's own report; the trainer's
        caching-allocator reservation on GPU (what empty_cache hands back), its live tensors on CPU."""
        trainer, engine = self.run.trainer, self.run.engine
        trainer_bytes = 0
        if torch.cuda.is_available():
            trainer_bytes = int(torch.cuda.memory_reserved())
        elif trainer is not None and not trainer.offloaded:
            trainer_bytes = sum(t.numel() * t.element_size() for t in trainer.local_state().values())
        return engine.memory_bytes() if engine else None, trainer_bytes

    def push(self, version: str) -> sm.StepResult:
        sm.fault_point("weight_update")  # TEST HOOK (K2SYS_FAULT): engine weights resumed, new ones not pushed
        rep = self.tg.call("push", version)
        return sm.StepResult(bytes_moved=int(rep["bytes"]), extra={
            "copy_ratio": rep["copy_ratio"], "bytes_copied": rep["bytes_copied"], "buckets": rep["buckets"],
            **device_extra()})

    def release_engine(self) -> sm.StepResult:
        self.run.engine.client.release_memory(None)  # kv_cache, weights, cuda_graph
        return sm.StepResult(extra=device_extra())

    def resume_kv(self) -> sm.StepResult:
        self.run.engine.client.resume_memory(["kv_cache", "cuda_graph"])
        self.run.engine.client.flush_cache()  # the pushes ran without flushing (SGLang flushes only when idle)
        return sm.StepResult(extra=device_extra())

    def offload(self) -> sm.StepResult:
        rep = self.tg.call("offload")
        return sm.StepResult(bytes_moved=int(rep["bytes"]), extra={
            "GBps": rep["GBps"], **{k: v for k, v in rep.items() if k.endswith("_bytes")}, **device_extra()})

    def onload(self) -> sm.StepResult:
        rep = self.tg.call("onload")
        return sm.StepResult(bytes_moved=int(rep["bytes"]), extra={"GBps": rep["GBps"], **device_extra()})

    def pause(self) -> None:
        self.run.engine.client.pause("abort")

    # ---- the train/inference mismatch probe --------------------------------------------------
    def probe_prompts(self):
        """A few T=1 samples with engine log-probs: the train/inference mismatch check."""
        n = self.r.mismatch_probe
        if n <= 0:
            return None
        reqs = [GenerateRequest(input_ids=tuple(prompt_ids(self.run.tok, t)), return_logprob=True,
                                sampling=SamplingParams(temperature=1.0, max_new_tokens=8,
                                                        stop_token_ids=tuple(self.stops),
                                                        sampling_seed=self.rng.randrange(1 << 30)))
                for t in self.rng.sample(self.prompts, min(n, len(self.prompts)))]
        return [(list(rq.input_ids), out) for rq, out in zip(reqs, self.run.engine.client.generate(reqs))]

    def mismatch_probe(self, probe) -> dict:
        samples = [Sample(group_id=i, family="probe", prompt_tokens=p, response_tokens=list(o.output_ids),
                          logprobs=list(o.output_logprobs or []), versions=[0] * len(o.output_ids))
                   for i, (p, o) in enumerate(probe) if o.output_ids]
        if not samples:
            return {}
        batch, _ = build_rl_batch(samples, self.pad, 0, StalePolicyConfig(mode="none"))
        lp = self.tg.call("logprobs", batch)
        mm = logprob_mismatch(batch["behaviour_lp"], lp, batch["loss_mask"])
        return {f"probe_mismatch/{k}": v for k, v in mm.items()}


# ---- helpers the loop composes ---------------------------------------------------------------
def device_extra() -> dict:
    """Device-wide free bytes (torch.cuda.mem_get_info: both processes' use shows) for a switch record."""
    from k2sys.trainer.offload import device_memory

    mem = device_memory()
    return {"device_free": mem["device_free_bytes"], "device_used": mem["device_total_bytes"] -
            mem["device_free_bytes"]} if mem else {}


def ptx_pool(sft_jsonl, tok: Any, limit: int = 2000) -> list[tuple[list[int], list[int]]]:
    """PTX rows: the first `limit` SFT conversations, tokenized with their loss masks."""
    rows = []
    for line in sft_jsonl.read_text().splitlines()[:limit]:
        row = json.loads(line)
        ids, mask = tokenize_chat(tok, row["messages"], row.get("tools"))
        rows.append((list(ids), list(mask)))
    return rows


def rollout_hooks(families: dict, tok: Any, trainer_call: Callable, it: int, groups: list, samples: list, pad: int,
                  stops: list[int]) -> tuple[dict, list]:
    """Reward families' after-rollout hooks (k2sys.rewards.gym), in the train phase: the trainer is onloaded
    and holds the weights the engine sampled with, so the policy can judge (critic=policy); returns the
    hooks' metrics and extra training rows (critic refresh)."""
    if not reward_gym.has_hooks(families):
        return {}, []
    ctx = reward_gym.HookContext(
        logprobs=lambda rows: reward_gym.sequence_logprobs(lambda b: trainer_call("logprobs", b), rows, pad),
        tokenize=lambda messages: tokenize_chat(tok, messages))
    records = reward_gym.rollout_records(groups, samples, tok, stops)
    return reward_gym.run_rollout_hooks(families, it, records, samples, ctx), ctx.train_rows


def reward_stats(families: dict) -> dict:
    """Cumulative reward calls and failures (per reason) of the user's reward (0 failures: all scored), and
    the failure counters of judged task families (reward_failures/<family>[/<reason>])."""
    out = reward_gym.reward_stats(families)
    fam = families.get("user")
    if fam is None:
        return out
    st = fam.reward.stats()
    return {**out, "reward_items": st["items"], "reward_failed": st["failed"],
            **{f"reward_failed/{k}": v for k, v in st["failures"].items()}}


def _regroup(trajs) -> list[list]:
    """Paused trajectories back into their groups (by group id, in order)."""
    by: dict[int, list] = {}
    for t in trajs:
        by.setdefault(t.group_id, []).append(t)
    return list(by.values())
