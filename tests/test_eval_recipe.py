"""The recipe's held-out evaluation through the benchmark harness (k2sys.eval.harness.evaluate_heldout and
RecipeRunner.run_eval): the same outcome tables, avg@k / unbiased pass@k and results file as `k2sys eval`.

- Outcome tables from `ScriptedEngine` (a unit-test fake InferenceEngine whose answer per (task, sample) is
  known) give exactly the closed-form avg@k and pass@k; a response cut before its stop token scores 0;
  greedy forces k = 1; each family gets max(eval.max_new_tokens, its rl budget) tokens.
- open_ended samples are each judged alone against the reference (the family's single-response reward),
  not against each other; instruction adds prompt- and constraint-level strict accuracy computed by the
  verifier's own checks.
- Episodes (tau) through the token-level agent loop RL uses, with its per-episode token cap.
- RecipeRunner.run_eval keeps its state/metrics keys (eval/<tag>/<family>/accuracy, pass@k/avg@k when
  k > 1), writes results.json that `k2sys eval compare` reads, and is not redone once committed.
"""

import json
import math
from types import SimpleNamespace

import pytest
from test_eval_harness import TAU_ROW, FakeTauEngine, tok  # noqa: F401  (tok: fixture)

from k2sys.eval import EvalConfig, evaluate_heldout, recipe_summary
from k2sys.eval.suite import load_results
from k2sys.tasks import get_family


class ScriptedEngine:
    """Unit-test fake InferenceEngine: respond(family, task index, sample index) -> (text, finish_reason);
    item and sample come from the harness's seed rule (seed = eval seed + 7919 * item + sample)."""

    def __init__(self, tok, tasks_by_family, respond, seed=1234):
        from k2sys.tasks.format import prompt_ids

        self.tok, self.respond, self.seed = tok, respond, seed
        self.by_prompt = {tuple(prompt_ids(tok, t)): (f, i) for f, ts in tasks_by_family.items()
                          for i, t in enumerate(ts)}
        self.max_new_tokens: dict[str, set] = {}
        self.calls = 0

    def generate(self, reqs):
        from k2sys.engine.api.protocol import GenerateOutput

        self.calls += 1
        out = []
        for r in reqs:
            fam, ti = self.by_prompt[tuple(r.input_ids)]
            item, j = divmod(r.sampling.sampling_seed - self.seed, 7919)
            assert item == ti
            self.max_new_tokens.setdefault(fam, set()).add(r.sampling.max_new_tokens)
            text, finish = self.respond(fam, ti, j)
            ids = list(self.tok.encode(text).ids) + ([r.sampling.stop_token_ids[0]] if finish == "stop" else [])
            out.append(GenerateOutput(rid=r.rid, output_ids=tuple(ids), finish_reason=finish))
        return out


def _pass_at_k(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_outcome_table_pass_at_k_cut_responses_and_budgets(tok, tmp_path):
    fam = get_family("arithmetic")
    tasks = fam.generate(4, seed=0, split="heldout")
    correct = [0, 1, 3, 4]

    def respond(f, ti, j):
        if (ti, j) == (3, 3):
            return tasks[ti].answer, "length"  # right text, but cut before its stop token: 0
        return (tasks[ti].answer if j < correct[ti] else "99999"), "stop"

    eng = ScriptedEngine(tok, {"arithmetic": tasks}, respond)
    res = evaluate_heldout(eng, tok, {"arithmetic": (fam, tasks)}, {}, EvalConfig(k=4, temperature=0.8,
                           max_new_tokens=8), budgets={"arithmetic": 40, "list_ops": 3}, out_dir=tmp_path / "a")
    rep = recipe_summary(res)["arithmetic"]
    c = [0, 1, 3, 3]  # what the verifier may count: the cut sample is wrong
    assert rep["accuracy"] == rep["avg@4"] == pytest.approx(sum(c) / 16)
    assert rep["pass@4"] == pytest.approx(sum(_pass_at_k(4, x, 4) for x in c) / 4) == 0.75
    assert rep["pass@1"] == pytest.approx(sum(_pass_at_k(4, x, 1) for x in c) / 4)
    assert (rep["n"], rep["k"], rep["temperature"]) == (4, 4, 0.8)
    assert eng.max_new_tokens == {"arithmetic": {40}}  # the family's budget beats eval.max_new_tokens
    saved = load_results(tmp_path / "a" / "results.json")  # the `k2sys eval` results format
    fam_res = saved["families"]["arithmetic"]
    assert sorted(sum(v) for v in fam_res["tasks"].values()) == sorted(map(float, c))
    assert fam_res["truncated"] == pytest.approx(1 / 16) and fam_res["max_tokens"] == 40
    lines = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 16 and sum(r["detail"].get("cut") == "length" for r in lines) == 1
    # greedy: one sample per task whatever eval.k says; a family without a budget gets eval.max_new_tokens
    eng = ScriptedEngine(tok, {"arithmetic": tasks}, respond)
    g = recipe_summary(evaluate_heldout(eng, tok, {"arithmetic": (fam, tasks)}, {},
                                        EvalConfig(k=4, temperature=0.0, max_new_tokens=8)))["arithmetic"]
    assert g["k"] == 1 and g["pass@1"] == g["accuracy"] == pytest.approx(3 / 4) and "pass@4" not in g
    assert eng.max_new_tokens == {"arithmetic": {8}}


def test_open_ended_samples_judged_alone_and_instruction_strict_figures(tok):
    from k2sys.rewards.instruction import InstructionVerifier

    oe = get_family("open_ended")
    inst = get_family("instruction", min_constraints=2, max_constraints=3,
                      kinds=["keywords", "no_commas", "lowercase", "forbidden", "end_phrase"])
    oe_tasks, if_tasks = oe.generate(2, seed=0, split="heldout"), inst.generate(6, seed=0, split="heldout")

    def answer(i):  # references, then references spoiled at the end (breaks some constraints, keeps others)
        return if_tasks[i].answer if i < 3 else if_tasks[i].answer + " Very, really awesome stuff maybe basically."

    def respond(f, ti, j):
        if f == "open_ended":
            return (oe_tasks[ti].answer if j == 0 else "no."), "stop"
        return answer(ti), "stop"

    fams = {"open_ended": (oe, oe_tasks), "instruction": (inst, if_tasks)}
    eng = ScriptedEngine(tok, {f: t for f, (_, t) in fams.items()}, respond)
    res = evaluate_heldout(eng, tok, fams, {}, EvalConfig(k=2, temperature=0.5, max_new_tokens=96))
    table = res["families"]["open_ended"]["tasks"]
    for t in oe_tasks:  # each sample against the reference, as the family's one-response reward says
        from k2sys.eval.heldout import TaskFamilyAdapter

        tid = TaskFamilyAdapter(oe).items([t])[0].id
        assert table[tid] == pytest.approx([oe.verify(t, t.answer), oe.verify(t, "no.")])
        # judged together the two samples would rank against each other instead (different rewards)
        assert oe.verify_batch([t, t], [t.answer, "no."]) != pytest.approx(table[tid])
    rep = recipe_summary(res)["instruction"]
    v = InstructionVerifier()
    checks = [v.check(t, answer(i)).checks for i, t in enumerate(if_tasks)]
    strict = sum(all(ch.values()) for ch in checks) / len(checks)
    shares = [sum(ch.values()) / len(ch) for ch in checks]
    assert 0.5 <= strict < 1.0  # the references pass; the spoiled answers fail some tasks
    assert rep["accuracy"] == rep["prompt_strict"] == rep["pass@2"] == pytest.approx(strict)
    assert rep["inst_strict"] == pytest.approx(sum(shares) / len(shares)) and strict < rep["inst_strict"] < 1.0


def test_episodes_through_the_token_level_agent_loop(tok):
    from k2sys.envs.agent_loop import AgentConfig
    from k2sys.eval.tau import tau_spec

    envs = {"tau": [tau_spec(TAU_ROW)]}
    rep = recipe_summary(evaluate_heldout(FakeTauEngine(tok), tok, {}, envs, EvalConfig(),
                                          agent=AgentConfig(max_turn_tokens=400, max_episode_tokens=8000)))["tau"]
    assert rep["accuracy"] == 1.0 and rep["pass@1"] == 1.0 and rep["mean_turns"] == 4 and rep["truncated"] == 0
    short = recipe_summary(evaluate_heldout(FakeTauEngine(tok), tok, {}, envs, EvalConfig(),
                                            agent=AgentConfig(max_turn_tokens=400, max_episode_tokens=250)))["tau"]
    assert short["accuracy"] == 0.0 and short["truncated"] == 1.0 and short["n"] == 1


class _Metrics:
    def __init__(self):
        self.records = []

    def log(self, kind, step, **values):
        self.records.append((kind, step, values))


def test_run_eval_keeps_report_keys_and_compare_reads_its_results(tok, tmp_path):
    from k2sys.config import apply_overrides
    from k2sys.coordinator.driver import RecipeRunner
    from k2sys.eval.cli import main
    from k2sys.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny-k2"), ["tasks.families=arithmetic", "eval.k=2", "eval.temperature=0.5",
                                                  'rl.budgets={"arithmetic": 12}', "name=evalrun"])
    fam = get_family("arithmetic")
    tasks = fam.generate(4, seed=0, split="heldout")
    right = {"sft": [0, 1, 1, 2], "rl": [2, 2, 1, 2]}  # correct samples of each task after SFT and after RL
    tag_now = {"tag": "sft"}
    eng = ScriptedEngine(tok, {"arithmetic": tasks},
                         lambda f, ti, j: (tasks[ti].answer if j < right[tag_now["tag"]][ti] else "0 0", "stop"))
    runner = SimpleNamespace(state={"rl_iter": 3}, families={"arithmetic": fam}, cfg=cfg, tok=tok, dir=tmp_path,
                             engine=SimpleNamespace(client=eng), metrics=_Metrics(), engine_call=lambda fn, **kw: fn(),
                             tasks=lambda split: {"arithmetic": tasks})
    runner.save_state = lambda **kw: runner.state.update(kw)
    for tag in ("sft", "rl"):
        tag_now["tag"] = tag
        rep = RecipeRunner.run_eval(runner, tag)["arithmetic"]
        c = right[tag]
        assert rep["accuracy"] == rep["avg@2"] == pytest.approx(sum(c) / 8)
        assert rep["pass@2"] == pytest.approx(sum(_pass_at_k(2, x, 2) for x in c) / 4)
        kind, step, values = runner.metrics.records[-1]
        assert (kind, step) == ("eval", 3)
        assert values == {f"{tag}/arithmetic/accuracy": rep["accuracy"], f"{tag}/arithmetic/avg@2": rep["avg@2"],
                          f"{tag}/arithmetic/pass@2": rep["pass@2"]}
        assert runner.state["eval"][tag]["arithmetic"] == rep
    calls = eng.calls
    assert RecipeRunner.run_eval(runner, "sft") == runner.state["eval"]["sft"] and eng.calls == calls  # committed
    out = tmp_path / "cmp.md"
    assert main(["compare", str(tmp_path / "eval" / "sft"), str(tmp_path / "eval" / "rl"), "--out", str(out),
                 "--no-png", "--resamples", "200"]) == 0
    assert "arithmetic" in out.read_text() and "avg@2" in out.read_text()


def test_difficulty_filter_keeps_judged_families_unfiltered(tok, tmp_path):
    """A critic-scored family has no solved sample (its rewards never reach 1): its prompts pass the
    filter unfiltered instead of all being dropped as too hard; verifiable ones are filtered."""
    from k2sys.config import apply_overrides
    from k2sys.coordinator.driver import RecipeRunner
    from k2sys.engine.api.protocol import GenerateOutput
    from k2sys.recipes import get_recipe
    from k2sys.tasks.base import Task
    from k2sys.tasks.format import prompt_ids

    cfg = apply_overrides(get_recipe("tiny-k2"), ["tasks.families=arithmetic", 'rl.budgets={"arithmetic": 12}',
                                                  "rl.filter_prompts=10", "rl.filter_samples=4", "rl.filter_low=0.1",
                                                  "rl.filter_high=0.9"])
    fam = get_family("arithmetic")
    tasks = fam.generate(6, seed=0, split="train")
    judged_fam = SimpleNamespace(verifiable=False)
    judged = [Task(prompt=f"write a poem about {w}", answer="", family="judged") for w in ("rain", "salt", "iron")]
    right = [0, 4, 2, 1, 3, 0]  # correct samples of 4: too hard, too easy, kept x3, too hard
    by_prompt = {tuple(prompt_ids(tok, t)): i for i, t in enumerate(tasks)}

    class FilterEngine:  # unit-test fake: n samples per prompt, the first right[i] of them correct
        def generate(self, reqs):
            out = []
            for r in reqs:
                i = by_prompt[tuple(r.input_ids)]  # a judged prompt reaching the engine fails here
                for j in range(r.sampling.n):
                    text = tasks[i].answer if j < right[i] else "0 0"
                    ids = tuple(tok.encode(text).ids) + (r.sampling.stop_token_ids[0],)
                    out.append(GenerateOutput(rid=f"{r.rid}-{j}", output_ids=ids, finish_reason="stop"))
            return out
    cfg.rl.budgets["judged"] = 12
    runner = SimpleNamespace(cfg=cfg, tok=tok, dir=tmp_path, families={"arithmetic": fam, "judged": judged_fam},
                             engine=SimpleNamespace(client=FilterEngine()), metrics=_Metrics(),
                             engine_call=lambda fn, **kw: fn(), tasks=lambda split: {"arithmetic": tasks,
                                                                                      "judged": judged})
    (tmp_path / "data").mkdir()
    kept = RecipeRunner.difficulty_filter(runner)
    assert sorted(t.prompt for t in kept) == sorted([tasks[i].prompt for i in (2, 3, 4)] + [t.prompt for t in judged])
    kind, _, values = runner.metrics.records[-1]
    assert kind == "filter" and values["filter/judged_unfiltered"] == 3 and values["filter/kept"] == 3
