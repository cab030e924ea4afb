"""Gym-like environments and the token-level multi-turn agent loop.

- ToolUseEnv played by the scripted expert agent gets full reward, and the same judged score as
  the synthesis pipeline's run_episode; reset(seed)+actions is deterministic (replay).
- The agent loop against a scripted engine (`FakeScriptedEngine`, a unit-test fake that answers
  each turn with the scripted agent's tokens) reproduces tokenize_chat of the conversation token
  for token, with the loss mask on exactly the assistant spans; a pause mid-turn or between
  turns resumes to the same tokens; malformed and over-long turns end the episode with the
  documented rewards.
- A real NativeEngine (untrained k2-tiny) runs episodes end to end; samples feed build_rl_batch
  with env tokens masked out of the loss.
"""

import asyncio
import dataclasses

import pytest

from k2sys.data.synth.judge import RubricJudge
from k2sys.data.synth.rollout import ScriptedPolicy, _parse_calls, run_episode
from k2sys.engine.api.protocol import GenerateOutput, SamplingParams
from k2sys.envs import EnvError, make_env, replay, synth_task, tool_use_specs
from k2sys.envs.agent_loop import AgentConfig, advance_episode, new_episode_group, run_episodes
from k2sys.tokenizer import load_tokenizer, parse_chat, render_chat, tokenize_chat, train_tokenizer
from k2sys.tasks.format import stop_token_ids


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from k2sys.tokenizer import default_corpus

    return load_tokenizer(train_tokenizer(default_corpus(n=800), 1024, tmp_path_factory.mktemp("tok")))


def _scripted_action(task, messages, tools, n_calls):
    out = ScriptedPolicy(task)(messages, tools)
    calls, problem = _parse_calls(out.get("tool_calls"), n_calls)
    assert not problem
    act = {"role": "assistant", "content": out.get("content") or ""}
    if calls:
        act["tool_calls"] = calls
    return act


def _play(spec, seed):
    env = make_env(spec)
    obs, info = env.reset(seed=seed)
    messages, actions, n_calls = list(obs), [], 0
    while True:
        act = _scripted_action(env.task, messages, info["tools"], n_calls)
        n_calls += len(act.get("tool_calls", []))
        actions.append(act)
        messages.append(act)
        obs, reward, term, trunc, step_info = env.step(act)
        messages += obs
        if term or trunc:
            return env, messages, actions, reward, term, step_info


@pytest.mark.parametrize("index", [0, 3, 7, 11])
def test_scripted_agent_solves_tool_use_env(index):
    spec = tool_use_specs(index + 1, seed=5, failure_rate=0.3)[index]
    env, messages, actions, reward, term, info = _play(spec, seed=2)
    assert term and reward == 1.0 and info["passed"]
    # The same task through the synthesis pipeline: same conversation, same verdict.
    traj = run_episode(synth_task(5, index), ScriptedPolicy(synth_task(5, index)), seed=2, failure_rate=0.3)
    assert traj.messages == messages
    assert RubricJudge()(traj).score == info["score"]


def test_replay_restores_the_env_and_checks_determinism():
    spec = tool_use_specs(4, seed=1, failure_rate=0.5)[3]
    _, messages, actions, reward, _, _ = _play(spec, seed=9)
    env, results = replay(spec, 9, actions[:-1])
    assert len(env.sim.log) == sum(len(a.get("tool_calls", [])) for a in actions[:-1])
    last = env.step(actions[-1])
    assert last[1] == reward and (last[2] or last[3])
    with pytest.raises(EnvError, match="ended at action"):
        replay(spec, 9, actions + actions)


def test_env_errors_name_the_field():
    with pytest.raises(EnvError, match="unknown"):
        make_env({"kind": "chess"})
    with pytest.raises(EnvError, match="'index'"):
        make_env({"kind": "tool_use", "seed": 0, "index": -1})
    with pytest.raises(EnvError, match="reward"):
        make_env({"kind": "tool_use", "seed": 0, "index": 0, "reward": "vibes"})
    env = make_env(tool_use_specs(1, 0)[0])
    with pytest.raises(EnvError, match="reset"):
        env.step({"role": "assistant", "content": "hi"})


def test_malformed_action_ends_the_episode_with_partial_credit():
    env = make_env(tool_use_specs(1, 0)[0])
    env.reset(seed=0)
    obs, reward, term, trunc, info = env.step({"role": "assistant", "content": "x", "malformed": "bad json"})
    assert term and not trunc and obs == [] and 0.0 <= reward < 1.0 and not info["passed"]
    env = make_env({**tool_use_specs(1, 0)[0], "reward": "pass"})
    env.reset(seed=0)
    assert env.step({"role": "assistant", "content": "x", "malformed": "bad"})[1] == 0.0


def test_turn_budget_truncates():
    env = make_env({**tool_use_specs(1, 0)[0], "max_turns": 1})
    obs, info = env.reset(seed=0)
    act = _scripted_action(env.task, list(obs), info["tools"], 0)
    assert act.get("tool_calls")  # the first turn calls a tool, so the goal is not done
    _, reward, term, trunc, _ = env.step(act)
    assert trunc and not term and reward < 1.0


def test_task_env_matches_the_verifier():
    from k2sys.tasks import get_family

    fam = get_family("list_ops", length=3)
    task = fam.generate(1, 0, "train")[0]
    env = make_env({"kind": "task", "task": task.to_dict(), "params": {"length": 3}})
    obs, info = env.reset()
    assert obs == [{"role": "user", "content": task.prompt}] and info["tools"] is None
    assert env.step({"role": "assistant", "content": fam.expert_solution(task)})[1] == 1.0
    env.reset()
    assert env.step({"role": "assistant", "content": "no idea"})[1] == 0.0


# ------------------------------------------------------------------ the token-level loop


class FakeScriptedEngine:
    """Unit-test fake engine: answers each turn with the scripted agent's next assistant message,
    tokenized, plus <|im_end|>. `abort_once_at`: abort the request with that (0-based) call
    index after `cut` tokens, as a pause(abort) would."""

    def __init__(self, tok, task, abort_once_at=None, cut=3, garbage=False, delay=0.0):
        self.tok, self.task, self.calls, self.delay = tok, task, 0, delay
        self.abort_once_at, self.cut, self.garbage = abort_once_at, cut, garbage
        self.stop = stop_token_ids(tok)

    def _turn_tokens(self, context):
        text = self.tok.decode(list(context), skip_special_tokens=False)
        messages, tools, gen = parse_chat(text[: text.rindex("<|im_assistant|>")])
        partial = text[text.rindex("<|im_middle|>") + len("<|im_middle|>"):]
        assert gen is False
        n_calls = sum(len(m.get("tool_calls", [])) for m in messages)
        if self.garbage:
            body = "<|tool_calls_section_begin|><|tool_call_begin|>oops"
        else:
            act = _scripted_action(self.task, messages, tools, n_calls)
            full = render_chat(messages + [act], tools)
            body = full[len(render_chat(messages, tools)) + len("<|im_assistant|>assistant<|im_middle|>"):]
            body = body[: -len("<|im_end|>")]
        ids = self.tok.encode(body).ids + [self.tok.token_to_id("<|im_end|>")]
        done = self.tok.encode(partial).ids if partial else []
        assert ids[: len(done)] == done, "resumed turn must continue the scripted text"
        return ids[len(done):]

    async def async_generate(self, reqs):
        (req,) = reqs
        await asyncio.sleep(self.delay)  # a real engine suspends the caller while it generates
        ids = self._turn_tokens(req.input_ids)
        i, self.calls = self.calls, self.calls + 1
        if i == self.abort_once_at:
            return [GenerateOutput(rid=req.rid, output_ids=tuple(ids[: self.cut]),
                                   output_logprobs=tuple([-0.5] * self.cut), finish_reason="abort")]
        reason = "stop"
        if len(ids) > req.sampling.max_new_tokens:
            ids, reason = ids[: req.sampling.max_new_tokens], "length"
        return [GenerateOutput(rid=req.rid, output_ids=tuple(ids), output_logprobs=tuple([-0.25] * len(ids)),
                               finish_reason=reason)]


def _episode(tok, spec, engine, cfg=None, seed=4, pauses=()):
    traj = new_episode_group(spec, 0, 1, tok, seed)[0]
    cfg = cfg or AgentConfig(max_turn_tokens=200, max_episode_tokens=4000)
    stop = stop_token_ids(tok)
    rounds = 0
    while not traj.meta["finished"]:
        stopping = (lambda r=rounds: r in pauses and bool(traj.meta["actions"]))
        asyncio.run(advance_episode(engine, tok, traj, version=rounds, sampling=SamplingParams(sampling_seed=1), cfg=cfg,
                                    stop_ids=stop, stopping=stopping))
        rounds += 1
        assert rounds < 50
    return traj, rounds


@pytest.mark.parametrize("index", [0, 5, 9])
def test_agent_loop_reproduces_tokenize_chat(tok, index):
    spec = tool_use_specs(index + 1, seed=3, failure_rate=0.3)[index]
    engine = FakeScriptedEngine(tok, synth_task(3, index))
    traj, _ = _episode(tok, spec, engine)
    m = traj.meta
    env, messages, actions, reward, *_ = _play(spec, seed=4)
    assert m["reward"] == reward and not m["truncated"] and m["actions"] == actions
    if index == 0:
        assert reward == 1.0 and m["env_info"]["passed"]
    ids, mask = tokenize_chat(tok, messages, env.tools)
    assert traj.prompt_tokens + traj.response_tokens == ids
    assert [0] * len(traj.prompt_tokens) + m["response_mask"] == mask
    assert len(traj.logprobs) == len(traj.response_tokens) == len(traj.versions)
    assert all(lp == -0.25 for lp, k in zip(traj.logprobs, m["response_mask"]) if k)
    assert all(lp == 0.0 for lp, k in zip(traj.logprobs, m["response_mask"]) if not k)


def test_agent_loop_pause_mid_turn_and_between_turns_resumes_exactly(tok):
    spec = tool_use_specs(2, seed=3, failure_rate=0.3)[1]
    straight, _ = _episode(tok, spec, FakeScriptedEngine(tok, synth_task(3, 1)))
    # abort the 2nd engine call after 3 tokens (mid-turn), and stop between turns in round 1
    paused, rounds = _episode(tok, spec, FakeScriptedEngine(tok, synth_task(3, 1), abort_once_at=1), pauses=(1,))
    assert rounds >= 3
    assert paused.response_tokens == straight.response_tokens
    assert paused.meta["response_mask"] == straight.meta["response_mask"]
    assert paused.meta["reward"] == straight.meta["reward"] == 1.0
    assert len(set(paused.versions)) >= 2 and paused.versions == sorted(paused.versions)


def test_agent_loop_malformed_and_length(tok):
    spec = tool_use_specs(1, seed=3)[0]
    bad, _ = _episode(tok, spec, FakeScriptedEngine(tok, synth_task(3, 0), garbage=True))
    assert bad.meta["finished"] and bad.meta["reward"] < 1.0 and "malformed" in bad.meta["actions"][0]
    short, _ = _episode(tok, spec, FakeScriptedEngine(tok, synth_task(3, 0)),
                        cfg=AgentConfig(max_turn_tokens=4, max_episode_tokens=4000))
    assert short.meta["truncated"] and short.meta["reward"] == 0.0 and short.meta["finish_reason"] == "length"
    assert len(short.response_tokens) == 4


def test_native_engine_episodes_and_rl_batch(tok, tmp_path):
    from k2sys.coordinator.rl_batch import Sample, build_rl_batch
    from k2sys.engine.core.config import EngineConfig
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.models import build_model, k2_tiny, save_hf
    from k2sys.rl.losses import StalePolicyConfig

    cfg = dataclasses.replace(k2_tiny(vocab_size=tok.get_vocab_size()), max_position_embeddings=1024)
    ckpt = save_hf(build_model(cfg, seed=0), tmp_path / "m")
    specs = tool_use_specs(2, seed=0)
    trajs = [t for g, s in enumerate(specs) for t in new_episode_group(s, g, 2, tok, seed=g)]
    acfg = AgentConfig(max_turn_tokens=24, max_episode_tokens=1000)
    with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=8192)) as eng:
        n = asyncio.run(run_episodes(eng, tok, trajs, version=0, temperature=1.0, top_p=1.0, cfg=acfg,
                                     stop_ids=stop_token_ids(tok), seed=0))
    assert n > 0 and all(t.meta["finished"] for t in trajs)
    samples = []
    for t in trajs:
        mk = t.meta["response_mask"]
        assert len(mk) == len(t.response_tokens) and mk[0] == 1
        assert 0.0 <= t.meta["reward"] <= 1.0
        samples.append(Sample(group_id=t.group_id, family="tool_use", prompt_tokens=t.prompt_tokens,
                              response_tokens=t.response_tokens, logprobs=t.logprobs, versions=t.versions,
                              reward=t.meta["reward"], response_mask=mk))
    batch, stats = build_rl_batch(samples, 0, 0, StalePolicyConfig(mode="none"))
    for i, s in enumerate(samples):
        p, r = len(s.prompt_tokens), len(s.response_tokens)
        assert batch["loss_mask"][i, p - 1: p - 1 + r].tolist() == [float(k) for k in s.response_mask]
        assert batch["loss_mask"][i].sum() == sum(s.response_mask)
    assert stats["response_tokens"] == sum(sum(s.response_mask) for s in samples)
    with pytest.raises(ValueError, match="response_mask"):
        build_rl_batch([dataclasses.replace(samples[0], response_mask=[1])], 0, 0, StalePolicyConfig(mode="none"))


def test_run_rollout_pauses_and_resumes_episodes(tok):
    """Episodes inside the coordinator's rollout: the time-budget pause leaves episodes
    unfinished (mid-episode); the next rollout resumes them to the same tokens and rewards as
    an uninterrupted run, and finished groups become Samples with the response mask."""
    from k2sys.coordinator.rollout import RolloutConfig, run_rollout
    from k2sys.rl.budget import BudgetConfig, BudgetController

    spec = tool_use_specs(3, seed=3, failure_rate=0.3)[2]
    task = synth_task(3, 2)
    budget = BudgetController(BudgetConfig(budgets={}))
    stops = stop_token_ids(tok)

    def rollout(groups, version, max_seconds):
        cfg = RolloutConfig(prompts_per_iter=1, samples_per_prompt=2, max_seconds=max_seconds)
        return run_rollout(FakeScriptedEngine(tok, task, delay=0.03), tok, {}, groups, version, 1.0, budget, cfg, stops,
                           pause=lambda: None, seed=0, agent=AgentConfig(max_turn_tokens=200, max_episode_tokens=4000))

    straight = rollout([new_episode_group(spec, 7, 2, tok, seed=1)], 0, 60.0)
    assert len(straight.samples) == 2 and not straight.unfinished
    groups = [new_episode_group(spec, 7, 2, tok, seed=1), new_episode_group(spec, 8, 2, tok, seed=1)]
    first = rollout(groups, 0, 0.05)  # the time budget pauses every episode after its first turns
    assert first.unfinished and first.stats["paused_requests"] > 0
    pending = {}
    for t in first.unfinished:
        pending.setdefault(t.group_id, []).append(t)
    second = rollout(list(pending.values()), 1, 60.0)
    samples = first.samples + second.samples
    assert len(samples) == 4 and not second.unfinished
    ref = straight.samples[0]
    for s in samples:
        assert s.response_tokens == ref.response_tokens and s.response_mask == ref.response_mask
        assert s.reward == ref.reward and s.family == "tool_use" and s.meta["turns"] >= 2
    assert any(len(set(s.versions)) == 2 for s in second.samples)  # resumed across a policy update


# ------------------------------------------------------------------ code env (bubblewrap sandbox)

from k2sys.envs import code_specs, code_tasks  # noqa: E402
from k2sys.rewards.sandbox import bwrap_available  # noqa: E402

needs_bwrap = pytest.mark.skipif(not bwrap_available()[0], reason=f"bubblewrap unavailable: {bwrap_available()[1]}")


def _prog(code: str) -> dict:
    return {"role": "assistant", "content": f"Here it is.\n```python\n{code}\n```"}


def test_code_tasks_are_deterministic_and_self_consistent():
    a, b = code_tasks(12, seed=4), code_tasks(20, seed=4)
    assert a == b[:12] and a != code_tasks(12, seed=5)
    assert len({t.statement for t in b}) > 3
    for t in a:
        assert len(t.tests) == 5 and len({x for x, _ in t.tests}) == 5


@needs_bwrap
def test_code_env_reference_passes_in_one_turn():
    for spec in code_specs(4, seed=1):
        env = make_env(spec)
        env.reset()
        obs, reward, term, trunc, info = env.step(_prog(env.task.reference))
        assert term and not trunc and obs == [] and reward == 1.0 and info["turns"] == 1


@needs_bwrap
def test_code_env_feedback_then_fix():
    env = make_env({**code_specs(1, seed=2)[0], "time_limit_s": 0.5})
    obs, _ = env.reset()
    x0, y0 = env.task.tests[0]
    assert x0.strip() in obs[1]["content"] and y0.strip() in obs[1]["content"]  # examples are shown
    obs, reward, term, trunc, _ = env.step({"role": "assistant", "content": "print(1)"})  # no code block
    assert not (term or trunc) and "```python" in obs[0]["content"] and reward == 0.0
    obs, reward, term, trunc, _ = env.step(_prog("while True:\n    pass"))
    assert not (term or trunc) and "ran out of time" in obs[0]["content"]
    obs, reward, term, trunc, info = env.step(_prog(env.task.reference))
    assert term and reward == 1.0 and info["turns"] == 3


@needs_bwrap
def test_code_env_out_of_turns_scores_the_last_program():
    env = make_env({**code_specs(1, seed=2)[0], "max_turns": 1})
    env.reset()
    obs, reward, term, trunc, info = env.step(_prog("import sys\nraise SystemExit(3)"))
    assert trunc and not term and reward == 0.0 and obs == []
    env = make_env({**code_specs(1, seed=2)[0], "max_turns": 1})
    env.reset()
    want = env.task.tests[0][1].strip()
    # right on exactly one test input (the first example): 1 of 5
    prog = f"import sys\nx = sys.stdin.read()\nprint({want!r} if x == {env.task.tests[0][0]!r} else 'nope')"
    _, reward, _, trunc, info = env.step(_prog(prog))
    assert trunc and reward == pytest.approx(1 / 5)


class FakeTurnsEngine:
    """Unit-test fake engine: replies with the given assistant texts in order (+ <|im_end|>)."""

    def __init__(self, tok, replies):
        self.tok, self.replies, self.i = tok, list(replies), 0

    async def async_generate(self, reqs):
        (req,) = reqs
        ids = self.tok.encode(self.replies[self.i]).ids + [self.tok.token_to_id("<|im_end|>")]
        self.i += 1
        return [GenerateOutput(rid=req.rid, output_ids=tuple(ids), output_logprobs=tuple([-1.0] * len(ids)),
                               finish_reason="stop")]


@needs_bwrap
def test_agent_loop_code_episode_masks_feedback(tok):
    spec = code_specs(1, seed=2)[0]
    task = code_tasks(1, seed=2)[0]
    wrong = _prog("print('no')")["content"]
    right = _prog(task.reference)["content"]
    traj, _ = _episode(tok, spec, FakeTurnsEngine(tok, [wrong, right]))
    m = traj.meta
    assert m["reward"] == 1.0 and len(m["actions"]) == 2 and m["finish_reason"] == "stop"
    env = make_env(spec)
    obs, _ = env.reset()
    feedback = env.step({"role": "assistant", "content": wrong})[0]
    messages = obs + [{"role": "assistant", "content": wrong}] + feedback + [{"role": "assistant", "content": right}]
    ids, mask = tokenize_chat(tok, messages)
    assert traj.prompt_tokens + traj.response_tokens == ids
    assert [0] * len(traj.prompt_tokens) + m["response_mask"] == mask
