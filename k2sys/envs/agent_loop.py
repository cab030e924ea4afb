"""Token-level multi-turn rollouts: an engine plays a Gym-like environment, turn by turn.

    prompt   = tokens of render_chat(env.reset(seed) messages, tools, generation prompt)
    repeat:  the engine generates one assistant turn on prompt + everything so far   (mask 1)
             its text is parsed (parse_assistant) into the action; env.step(action)
             the observation is rendered with render_continuation and appended     (mask 0)
    until    the env ends the episode (reward), a turn hits its token cap or the episode its
             token budget (truncated: reward 0), or the coordinator pauses the engine.

Tokens are never re-tokenized: what the model generated stays in the sequence as generated, and
environment turns start and end on special tokens, so sequence == tokenize_chat(conversation)
whenever the model's text renders back to the same tokens (tests hold the loop to that).

An episode is a PartialTrajectory (k2sys.rl.rollout_buffer) whose meta carries the env spec,
the seed, the actions so far and the response mask; a paused episode resumes next iteration on
new weights: mid-turn from its partial tokens, with the env rebuilt by replaying its actions.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from k2sys.config import ConfigError
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams, fit_new_tokens
from k2sys.envs.base import Env, make_env, replay
from k2sys.rl.rollout_buffer import PartialTrajectory
from k2sys.tokenizer import parse_assistant, render_chat, render_continuation

__all__ = ["AgentConfig", "new_episode_group", "is_episode", "advance_episode", "run_episodes"]


@dataclass(kw_only=True)
class AgentConfig:
    max_turn_tokens: int = 96
    """Cap on one assistant turn's generated tokens; a turn cut there ends the episode (reward 0)."""
    max_episode_tokens: int = 768
    """Cap on prompt + all turns + observations; past it the episode ends truncated (reward 0)."""

    def validate(self) -> None:
        if self.max_turn_tokens < 1 or self.max_episode_tokens < 2:
            raise ConfigError("agent.max_turn_tokens must be >= 1 and agent.max_episode_tokens >= 2")


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` with no added specials (tokenizers.Tokenizer or a transformers fast one)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return list(backend.encode(text, add_special_tokens=False).ids)


def new_episode_group(spec: dict, group_id: int, k: int, tokenizer: Any, seed: int,
                      family: str | None = None) -> list[PartialTrajectory]:
    """K episodes of one env spec and env seed (a K2 loss group: same task, same tool randomness)."""
    env = make_env(spec)
    obs, info = env.reset(seed=seed)
    prompt = _encode(tokenizer, render_chat(obs, info.get("tools"), add_generation_prompt=True))
    fam = family or spec["kind"]
    return [PartialTrajectory(uid=uuid.uuid4().hex, group_id=group_id, prompt_tokens=list(prompt), meta={
        "env": dict(spec), "env_seed": int(seed), "family": fam, "actions": [], "call_ids": [], "turn_start": 0,
        "response_mask": [], "finished": False, "finish_reason": None, "reward": 0.0, "truncated": False,
        "env_info": {}, "group_size": k}) for _ in range(k)]


def is_episode(traj: PartialTrajectory) -> bool:
    return "env" in traj.meta


def _finish(traj: PartialTrajectory, reward: float, truncated: bool, reason: str, info: dict | None = None) -> None:
    m = traj.meta
    m.update(finished=True, finish_reason=reason, reward=float(reward), truncated=bool(truncated),
             env_info=dict(info or {}))


async def advance_episode(engine: Any, tokenizer: Any, traj: PartialTrajectory, *, version: int,
                          sampling: SamplingParams, cfg: AgentConfig, stop_ids: list[int],
                          stopping: Callable[[], bool], env: Env | None = None) -> int:
    """Play `traj` until it ends or the rollout stops (pause); returns tokens generated.

    `sampling` gives temperature/top_p/seed; max_new_tokens and stop ids are set per turn.
    `env` is the live env when the episode is fresh; otherwise it is rebuilt by replay.
    """
    m = traj.meta
    if m["finished"]:
        return 0
    if env is None:  # env steps may run programs in the sandbox: off the event loop
        env, _ = await asyncio.to_thread(replay, m["env"], m["env_seed"], m["actions"])
    generated = 0
    turn_no = len(m["actions"])
    while not m["finished"]:
        if stopping():
            return generated  # paused between turns: resumes at the next turn
        used = len(traj.prompt_tokens) + len(traj.response_tokens)
        in_turn = len(traj.response_tokens) - m["turn_start"]
        room = min(cfg.max_turn_tokens - in_turn, cfg.max_episode_tokens - used)
        if room <= 0:
            _finish(traj, 0.0, True, "length")
            break
        seed = None if sampling.sampling_seed is None else sampling.sampling_seed * 1009 + turn_no
        sp = SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                            max_new_tokens=fit_new_tokens(engine, len(traj.context_tokens), room), stop_token_ids=tuple(stop_ids),
                            sampling_seed=seed)
        out = (await engine.async_generate([GenerateRequest(input_ids=tuple(traj.context_tokens), sampling=sp,
                                                            return_logprob=True)]))[0]
        ids = list(out.output_ids)
        traj.extend(ids, list(out.output_logprobs or [0.0] * len(ids)), version)
        m["response_mask"].extend([1] * len(ids))
        generated += len(ids)
        if out.finish_reason == "abort":
            return generated  # paused mid-turn: the partial turn continues next time
        if out.finish_reason != "stop":
            _finish(traj, 0.0, True, "length")  # the turn or the episode ran out of tokens
            break
        turn = traj.response_tokens[m["turn_start"]:]
        if turn and turn[-1] in stop_ids:
            turn = turn[:-1]
        parsed = parse_assistant(tokenizer.decode(turn, skip_special_tokens=False))
        action: dict[str, Any] = parsed.to_message()
        if parsed.errors:
            action["malformed"] = "; ".join(parsed.errors)
        m["actions"].append(action)
        m["call_ids"].extend(c["id"] for c in action.get("tool_calls", []))
        turn_no += 1
        obs, reward, terminated, truncated, info = await asyncio.to_thread(env.step, action)
        if terminated or truncated:
            _finish(traj, reward, truncated, "stop", info)
            break
        cont = _encode(tokenizer, render_continuation(obs, m["call_ids"]))
        traj.extend(cont, [0.0] * len(cont), version)
        m["response_mask"].extend([0] * len(cont))
        m["turn_start"] = len(traj.response_tokens)
        if len(traj.prompt_tokens) + len(traj.response_tokens) >= cfg.max_episode_tokens:
            _finish(traj, 0.0, True, "length")
    return generated


async def run_episodes(engine: Any, tokenizer: Any, trajs: list[PartialTrajectory], *, version: int,
                       temperature: float, top_p: float, cfg: AgentConfig, stop_ids: list[int], seed: int,
                       stopping: Callable[[], bool] = lambda: False) -> int:
    """Advance every unfinished episode concurrently (the engine batches their turns)."""
    coros = []
    for i, t in enumerate(trajs):
        sp = SamplingParams(temperature=temperature, top_p=top_p, sampling_seed=seed * 100_003 + i)
        coros.append(advance_episode(engine, tokenizer, t, version=version, sampling=sp, cfg=cfg,
                                     stop_ids=stop_ids, stopping=stopping))
    return sum(await asyncio.gather(*coros))
