import math
import time

import pytest
import torch

from k2sys.rewards import (CodeVerifier, EngineJudge, HeuristicJudge, InstructionVerifier, RewardGym,
                           RubricCritic, RubricItem, SandboxConfig, ScoredResponse, build_preference_pairs,
                           bwrap_available, default_gym, default_rubric, extract_code, pairwise_ranking_loss,
                           run_python)
from k2sys.rewards.critic import Rubric
from k2sys.tasks import Task, get_family

_BWRAP_OK, _BWRAP_WHY = bwrap_available()
needs_bwrap = pytest.mark.skipif(not _BWRAP_OK, reason=f"bubblewrap sandbox unavailable: {_BWRAP_WHY}")

SUM_TASK = Task(prompt="Read two ints, print their sum.", answer="print(sum(map(int, input().split())))",
                family="code", meta={"tests": [{"stdin": "1 2\n", "stdout": "3\n"},
                                               {"stdin": "10 -4\n", "stdout": "6"},
                                               {"stdin": "0 0\n", "stdout": "0\n"}]})


# ---- gym -----------------------------------------------------------------------------------
def test_gym_routes_by_family():
    gym = default_gym(sandbox=SandboxConfig(time_limit_s=10.0))
    assert {"arithmetic", "countdown", "list_ops", "code", "instruction"} <= set(gym.families())
    tasks = get_family("arithmetic").generate(3, seed=0) + get_family("countdown").generate(2, seed=0)
    responses = [t.answer for t in tasks[:4]] + ["nope"]
    assert gym.score_batch(tasks, responses) == [1.0, 1.0, 1.0, 1.0, 0.0]
    with pytest.raises(KeyError, match="open_ended"):
        gym.score(Task(prompt="p", answer="", family="open_ended"), "x")
    with pytest.raises(ValueError, match="replace"):
        gym.register("arithmetic", lambda t, r: 0.0)
    with pytest.raises(ValueError, match="pair"):
        gym.score_batch(tasks, responses[:2])
    g = RewardGym()
    g.register("x", lambda t, r: 0.25)
    assert g.score(Task(prompt="", answer="", family="x"), "") == 0.25


# ---- code sandbox --------------------------------------------------------------------------
@needs_bwrap
def test_code_reward_pass_rate():
    v = CodeVerifier(SandboxConfig(time_limit_s=10.0))
    assert v(SUM_TASK, SUM_TASK.answer) == 1.0
    # Right only when the second number is non-negative: 2 of 3 cases.
    partial = "a, b = map(int, input().split())\nprint(a + abs(b))"
    assert v(SUM_TASK, f"Here you go:\n```python\n{partial}\n```\nThanks") == pytest.approx(2 / 3)
    assert v(SUM_TASK, "print(") == 0.0
    assert extract_code("```py\nA\n```\n```python\nB\n```") == "B\n"


@needs_bwrap
def test_sandbox_limits_time_and_memory():
    cfg = SandboxConfig(time_limit_s=1.0, memory_limit_mb=128)
    t0 = time.monotonic()
    res = CodeVerifier(cfg).check(SUM_TASK, "while True:\n    pass")
    assert res.passed == 0 and res.timed_out == 1 and time.monotonic() - t0 < 5  # stopped after one case
    mem = run_python("x = bytearray(512 << 20)\nprint('allocated')", "", cfg)
    assert "allocated" not in mem.stdout and mem.returncode != 0
    big = run_python("print('x' * 10**6)", "", SandboxConfig(max_output_bytes=1000))
    assert big.output_truncated and not big.ok and len(big.stdout) <= 1000


@needs_bwrap
def test_sandbox_isolates_host(tmp_path, monkeypatch):
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    monkeypatch.setenv("K2SYS_TEST_SECRET", "leak")
    probe = f"""
import os, socket
try:
    print(open({str(secret)!r}).read())
except OSError as e:
    print("no-read", type(e).__name__)
try:
    open({str(tmp_path / 'written.txt')!r}, "w").write("x")
    print("wrote")
except OSError:
    print("no-write")
try:
    socket.create_connection(("127.0.0.1", 22), timeout=1)
    print("net")
except OSError:
    print("no-net")
print(os.environ.get("K2SYS_TEST_SECRET"), os.getuid(), os.path.exists("/work"), os.path.exists("/root"))
"""
    res = run_python(probe, "")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[:3] == ["no-read FileNotFoundError", "no-write", "no-net"]
    assert res.stdout.split("\n")[3] == "None 65534 False False"
    assert not (tmp_path / "written.txt").exists()


def test_sandbox_config_validation():
    with pytest.raises(ValueError, match="time_limit_s"):
        SandboxConfig(time_limit_s=0)
    with pytest.raises(ValueError, match="memory_limit_mb"):
        SandboxConfig(memory_limit_mb=1)


# ---- instruction following -----------------------------------------------------------------
def itask(*constraints):
    return Task(prompt="List three risks of the plan, under 30 words, mention budget.", answer="",
                family="instruction", meta={"constraints": list(constraints)})


def test_instruction_checks_and_hack_check():
    v = InstructionVerifier()
    t = itask({"kind": "bullets", "count": 3}, {"kind": "max_words", "n": 30},
              {"kind": "include", "keywords": ["budget"]})
    good = "- budget overrun\n- late delivery\n- staff turnover"
    assert v(t, good) == 1.0
    assert v(t, "- budget overrun\n- late delivery") == 0.0
    # Claims compliance and fails (two bullets): caught, reward = hack_penalty.
    hack = "- budget overrun\n- late delivery\nThis response contains exactly 3 bullet points."
    res = v.check(t, hack)
    assert res.hacked and res.reward == 0.0 and res.claims
    assert InstructionVerifier(hack_penalty=-1.0)(t, hack) == -1.0
    # A true claim is not a hack (but the words still count).
    honest = good + "\nAs requested."
    assert not v.check(t, honest).hacked and v(t, honest) == 1.0
    assert InstructionVerifier(partial_credit=True)(t, "- budget overrun\n- late delivery") == pytest.approx(2 / 3)
    assert v(t, "- budget " + "word " * 40 + "\n- b\n- c") == 0.0


@pytest.mark.parametrize("constraint,ok,bad", [
    ({"kind": "min_words", "n": 3}, "one two three", "one two"),
    ({"kind": "exclude", "keywords": ["sorry"]}, "fine", "Sorry, no"),
    ({"kind": "ends_with", "text": "Done."}, "All good. Done.", "Done. All good."),
    ({"kind": "lowercase"}, "all lower", "Not lower"),
    ({"kind": "no_commas"}, "a b", "a, b"),
    ({"kind": "paragraphs", "count": 2}, "p1\n\np2", "p1\np2"),
    ({"kind": "bullets", "count": 2}, "1. a\n2) b", "1. a\nb"),
])
def test_each_constraint_kind(constraint, ok, bad):
    v = InstructionVerifier()
    assert v(itask(constraint), ok) == 1.0 and v(itask(constraint), bad) == 0.0


def test_instruction_judge_path_and_errors():
    def fake_judge(prompt, response, condition):  # test double for an LLM judge
        return "polite" in condition and "please" in response
    t = itask({"kind": "judge", "condition": "the tone is polite"})
    assert InstructionVerifier(judge=fake_judge)(t, "please wait") == 1.0
    with pytest.raises(ValueError, match="judge"):
        InstructionVerifier()(t, "x")
    with pytest.raises(ValueError, match="unknown constraint"):
        InstructionVerifier()(itask({"kind": "rhymes"}), "x")
    with pytest.raises(ValueError, match="count"):
        InstructionVerifier()(itask({"kind": "bullets"}), "x")
    with pytest.raises(ValueError, match="constraints"):
        InstructionVerifier()(itask(), "x")


# ---- self-critique rubric reward -----------------------------------------------------------
def test_rubric_critic_weighted_score_and_prescriptive_rules():
    critic = RubricCritic(HeuristicJudge())
    prompt = "Explain why caching speeds up repeated database queries."
    plain = "Caching keeps recent query results in memory. Repeated queries skip the database."
    flattering = "Great question! " + plain
    justified = plain + " My response meets all your requirements."
    s_plain, s_flat, s_just = (critic.score(prompt, r) for r in (plain, flattering, justified))
    assert s_plain.per_item["no_flattery"] == 1.0 and s_flat.per_item["no_flattery"] == 0.0
    assert s_just.per_item["no_self_justification"] == 0.0
    assert s_plain.total > s_flat.total and s_plain.total > s_just.total
    items = default_rubric().items
    assert s_plain.total == pytest.approx(sum(i.weight * s_plain.per_item[i.name] for i in items)
                                          / sum(i.weight for i in items))
    # Task-specific rubric items come from the task and carry their weight.
    task = Task(prompt=prompt, answer="", family="open_ended",
                meta={"rubric": [{"name": "mentions", "description": "names the cache layer", "weight": 3.0,
                                  "params": {"keywords": ["memory", "redis"]}}]})
    sc = critic.score(task.prompt, plain, [RubricItem(**{"category": "task", **task.meta["rubric"][0]})])
    assert sc.per_item["mentions"] == 0.5
    assert critic(task, plain) == pytest.approx(sc.total)
    gym = default_gym(critic=critic)
    assert gym.score(task, plain) == pytest.approx(sc.total)


def test_critic_rejects_bad_judges_and_items():
    with pytest.raises(ValueError, match="scores must be in"):
        RubricCritic(lambda p, r, i: 1.5).score("p", "r")
    with pytest.raises(KeyError, match="cannot judge"):
        RubricCritic(HeuristicJudge(), Rubric(items=[RubricItem(name="humour", description="funny")])).score("p", "r")
    with pytest.raises(ValueError, match="weight"):
        RubricItem(name="x", description="y", weight=0)
    with pytest.raises(ValueError, match="category"):
        RubricItem(name="x", description="y", category="style")


def test_engine_judge_parses_scores():
    replies = iter(["Reasoning...\nScore: 7", "Score: 10", "I refuse", "Score: 11"])
    judge = EngineJudge(lambda text: next(replies))  # test double for an engine client
    item = default_rubric().items[0]
    assert [judge("p", "r", item) for _ in range(4)] == [0.7, 1.0, 0.0, 0.0]
    assert judge.unparsed == 2


def test_preference_pairs_from_verifiable_rewards():
    samples = [ScoredResponse(prompt="a", response=r, reward=w) for r, w in
               [("47", 1.0), ("48", 0.0), ("46", 0.0), ("47 ", 1.0)]]
    samples.append(ScoredResponse(prompt="b", response="x", reward=0.5))
    pairs = build_preference_pairs(samples, min_margin=0.5)
    got = sorted((p.better, p.worse) for p in pairs)
    assert got == sorted([("47", "48"), ("47", "46"), ("47 ", "48"), ("47 ", "46")])
    assert all(p.margin == 1.0 and p.prompt == "a" for p in pairs)
    assert len(build_preference_pairs(samples, max_pairs_per_prompt=2, seed=1)) == 2
    with pytest.raises(ValueError, match="min_margin"):
        build_preference_pairs(samples, min_margin=0)


def test_pairwise_ranking_loss_matches_bradley_terry():
    sb = torch.tensor([0.3, -1.0, 2.0, 40.0], dtype=torch.float64, requires_grad=True)
    sw = torch.tensor([0.1, 1.0, 2.0, -40.0], dtype=torch.float64, requires_grad=True)
    want = [-math.log(1 / (1 + math.exp(-(b - w)))) for b, w in zip(sb.tolist(), sw.tolist())]
    assert pairwise_ranking_loss(sb, sw, "none").tolist() == pytest.approx(want, rel=1e-12)
    assert pairwise_ranking_loss(sb, sw).item() == pytest.approx(sum(want) / 4, rel=1e-12)
    assert pairwise_ranking_loss(sb, sw, "sum").item() == pytest.approx(sum(want), rel=1e-12)
    assert torch.autograd.gradcheck(pairwise_ranking_loss, (sb, sw))
    big = pairwise_ranking_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert big.item() == pytest.approx(2000.0) and math.isfinite(big.item())
    with pytest.raises(ValueError, match="shape"):
        pairwise_ranking_loss(sb, sw[:2])


def test_critic_trained_on_verifiable_pairs_ranks_correct_first():
    # A linear critic on two text features learns, from arithmetic pairs, to prefer the
    # strictly formatted answer: the transfer mechanism of seed 4.2 in miniature.
    fam = get_family("arithmetic")
    tasks = fam.generate(40, seed=0)
    samples = []
    for t in tasks:
        for resp in (t.answer, f"The answer is {t.answer}"):
            samples.append(ScoredResponse(prompt=t.prompt, response=resp, reward=fam.verify(t, resp)))
    pairs = build_preference_pairs(samples)
    feats = lambda r: torch.tensor([len(r.split()), float(r.strip().lstrip("-").isdigit())])
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    fb = torch.stack([feats(p.better) for p in pairs])
    fw = torch.stack([feats(p.worse) for p in pairs])
    first = pairwise_ranking_loss(fb @ w, fw @ w).item()
    for _ in range(50):
        opt.zero_grad()
        loss = pairwise_ranking_loss(fb @ w, fw @ w)
        loss.backward()
        opt.step()
    assert first == pytest.approx(math.log(2)) and loss.item() < 0.1 * first
    held = fam.generate(10, seed=0, split="heldout")
    assert all((feats(t.answer) @ w) > (feats(f"= {t.answer} ok") @ w) for t in held)
