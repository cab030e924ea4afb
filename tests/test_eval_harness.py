"""Evaluation harness (k2sys.eval): estimators, benchmark adapters, comparison report, end to end.

- pass@k equals the closed form 1 - C(n-c,k)/C(n,k) (exact integers) and brute-force enumeration of
  k-subsets; avg@k and family/overall figures equal hand computations on synthetic outcome tables.
- Each adapter reads hand-written rows in its benchmark's published layout and scores right and wrong
  answers; HumanEval/MBPP programs run in the bubblewrap sandbox only (a program that writes to the host
  fails and leaves no file); IFEval strict vs loose; tau episodes reward the right tool calls only.
- Answer extraction / equivalence cases (LaTeX, fractions, units, intervals, sympy algebra, unsafe text).
- The comparison report on two synthetic result sets: Wilson/Newcombe against published values, deltas
  with paired bootstrap intervals, markdown + PNG.
- End to end: run_suite against `FakeGenerator` (a unit-test fake whose correctness per (task, sample) is
  a known table) gives exactly the table's avg@n and pass@k; the CLI compare step writes the report;
  EngineChatGenerator over `FakeEngine` (a unit-test fake InferenceEngine). The recipe's held-out
  evaluation through this harness: tests/test_eval_recipe.py.
"""

import gzip
import itertools
import json
import math
import random
import re
from fractions import Fraction
from pathlib import Path

import pytest

from k2sys.eval import avg_at_k, family_metrics, overall_metrics, pass_at_k
from k2sys.eval.adapters import get_adapter, humaneval_program
from k2sys.eval.answers import (extract_gsm8k_answer, extract_math_answer, gsm8k_reference, math_equal,
                                normalize_math)
from k2sys.eval.compare import (bootstrap_ci, compare_results, newcombe_interval, paired_bootstrap_delta,
                                render_markdown, wilson_interval, write_report)
from k2sys.eval.generators import ChatRequest, Completion
from k2sys.rewards.ifeval import check_instruction, check_row
from k2sys.eval.suite import SamplingConfig, SuiteEntry, load_results, parse_suite_arg, run_suite
from k2sys.rewards.sandbox import bwrap_available

needs_sandbox = pytest.mark.skipif(not bwrap_available()[0], reason=f"bubblewrap sandbox: {bwrap_available()[1]}")


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ estimators

def test_pass_at_k_closed_form_and_brute_force():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                closed = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                assert pass_at_k(n, c, k) == pytest.approx(float(closed), abs=1e-12), (n, c, k)
                if n <= 8:  # share of k-subsets of the n samples that hold a correct one
                    samples = [1] * c + [0] * (n - c)
                    subsets = list(itertools.combinations(range(n), k))
                    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
                    assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    # large n: the product form stays exact where the binomials are astronomically large
    exact = 1 - Fraction(math.comb(1997, 1000), math.comb(2000, 1000))
    assert pass_at_k(2000, 3, 1000) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(4, 1, 5)


def test_avg_and_family_metrics_on_synthetic_table():
    table = {"a": [1.0, 0.0, 0.0, 1.0], "b": [0.5, 0.5, 0.5, 0.5], "c": [1.0, 1.0, 1.0, 0.0]}
    assert avg_at_k(table) == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    m = family_metrics(table, [1, 2, 4])
    assert set(m) == {"avg@4", "pass@1", "pass@2", "pass@4"}
    # partial credit (task b) is never "correct" at threshold 1.0
    assert m["pass@1"] == pytest.approx((2 / 4 + 0 + 3 / 4) / 3)
    assert m["pass@2"] == pytest.approx(((1 - 1 / 6) + 0 + 1.0) / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert family_metrics(table, [1], threshold=0.5)["pass@1"] == pytest.approx((0.5 + 1 + 0.75) / 3)
    with pytest.raises(ValueError, match="k=\\[5\\]"):
        family_metrics(table, [5])
    ov = overall_metrics({"x": table, "y": {"d": [0.0] * 4}}, [1])
    assert ov["micro"]["pass@1"] == pytest.approx((0.5 + 0 + 0.75 + 0) / 4)
    assert ov["macro"]["pass@1"] == pytest.approx((m["pass@1"] + 0.0) / 2)


# ------------------------------------------------------------------ answers

@pytest.mark.parametrize("pred,ref,equal", [
    ("\\frac{1}{2}", "0.5", True), ("\\dfrac12", "1/2", True), ("\\tfrac{3}{4}", "0.75", True),
    ("\\frac{\\sqrt{3}}{2}", "\\frac12\\sqrt3", True), ("2\\pi", "\\pi \\cdot 2", True),
    ("x^2+2x+1", "(x+1)^2", True), ("x+1", "x+2", False), ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("(1,2]", "(1, 2]", True), ("(1,2)", "[1,2]", False), ("\\{1,2\\}", "\\{2,1\\}", True), ("(1,2)", "(2,1)", False),
    ("10\\%", "10", True), ("5\\text{ cm}", "5", True), ("90^\\circ", "90", True), ("\\$18.90", "18.9", True),
    ("x = 3", "3", True), ("1,000", "1000", True), ("\\text{(C)}", "(C)", True), ("3", "4", False),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("__import__('os').system('true')", "1", False), ("9^{9^{9^{9}}}", "1", False), (None, "1", False),
])
def test_math_equivalence(pred, ref, equal):
    assert math_equal(pred, ref) is equal


def test_answer_extraction():
    assert extract_math_answer("so $x=2$, thus \\boxed{\\frac{1}{2}} hmm no \\boxed{\\frac{3}{\\sqrt{2}}}.") \
        == "\\frac{3}{\\sqrt{2}}"
    assert extract_math_answer("\\fbox{7} then \\boxed 9$") == "9"
    assert extract_math_answer("The answer is 12.") == "12"
    assert extract_math_answer("no answer here") is None
    assert normalize_math(" \\dfrac{1}{2} ") == normalize_math("\\frac12") == "\\frac{1}{2}"
    assert gsm8k_reference("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,072") == "1072"
    assert extract_gsm8k_answer("3 + 4 = 7 and then 2.\n#### 7") == "7"
    assert extract_gsm8k_answer("Total: $1,234.50 is the answer is $1,234.50.") == "1234.50"
    assert extract_gsm8k_answer("first 12, then 15 apples.") == "15"
    assert extract_gsm8k_answer("no digits") is None


# ------------------------------------------------------------------ adapters

def test_gsm8k_and_math_adapters(tmp_path):
    gsm = _write_jsonl(tmp_path / "test.jsonl", [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                     "May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"},
        {"question": "A shop sells 1200 pens a day. How many in 2 days?",
         "answer": "1200*2=<<1200*2=2400>>2400\n#### 2,400"}])
    ad = get_adapter("gsm8k")
    items = ad.load(gsm)
    assert [i.reference for i in items] == ["72", "2400"] and "#### <number>" in items[0].messages[0]["content"]
    assert ad.score(items[0], "24 in May, so 72 total.\n#### 72").reward == 1.0
    assert ad.score(items[1], "The answer is 2,400 pens.").reward == 1.0
    assert ad.score(items[0], "#### 71").reward == 0.0

    folder = tmp_path / "MATH" / "test" / "algebra"  # the original release: one JSON object per problem
    folder.mkdir(parents=True)
    (folder / "1.json").write_text(json.dumps({
        "problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "level": "Level 1", "type": "Algebra",
        "solution": "We have $\\frac{1}{2} + \\frac{1}{4} = \\boxed{\\frac{3}{4}}$."}))
    (folder / "2.json").write_text(json.dumps({
        "problem": "Solve $x^2 = 4$ for $x>0$.", "level": "Level 2", "type": "Algebra",
        "solution": "So $x = \\boxed{2}$."}))
    ad = get_adapter("math")
    items = ad.load(tmp_path / "MATH" / "test")
    assert [i.id for i in items] == ["algebra/1.json", "algebra/2.json"]
    assert items[0].reference == "\\frac{3}{4}" and items[0].meta == {"level": "Level 1", "type": "Algebra"}
    assert ad.score(items[0], "Adding: \\boxed{0.75}").reward == 1.0
    assert ad.score(items[0], "\\boxed{\\frac{3}{5}}").reward == 0.0
    m500 = _write_jsonl(tmp_path / "math500.jsonl", [  # MATH-500 layout: answer and unique_id given
        {"problem": "Compute $\\sqrt{12}$.", "solution": "$\\sqrt{12} = \\boxed{2\\sqrt{3}}$", "answer": "2\\sqrt{3}",
         "subject": "Algebra", "level": 1, "unique_id": "test/algebra/99.json"}])
    it = ad.load(m500)[0]
    assert it.id == "test/algebra/99.json" and ad.score(it, "\\boxed{\\sqrt{3}\\cdot 2}").reward == 1.0
    with pytest.raises(ValueError, match="field 'problem'"):
        ad.load(_write_jsonl(tmp_path / "bad.jsonl", [{"question": "x"}]))


IFEVAL_ROWS = [
    {"key": 1000, "prompt": "Write a 30+ word summary of the wikipedia page. Do not use any commas and highlight "
                            "at least 3 sections that has titles in markdown format.",
     "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                             "length_constraints:number_words"],
     "kwargs": [{}, {"num_highlights": 3}, {"relation": "at least", "num_words": 30}]},
    {"key": 1001, "prompt": "Write a short note about Paris in all lowercase letters. End with a P.S.",  # HF nulls
     "instruction_id_list": ["change_case:english_lowercase", "detectable_content:postscript"],
     "kwargs": [{"num_highlights": None, "relation": None, "postscript_marker": None},
                {"num_highlights": None, "relation": None, "postscript_marker": "P.S."}]},
]


def test_ifeval_adapter_strict_and_loose(tmp_path):
    ad = get_adapter("ifeval")
    items = ad.load(_write_jsonl(tmp_path / "input_data.jsonl", IFEVAL_ROWS))
    assert [i.id for i in items] == ["1000", "1001"]
    words = " ".join(["word"] * 30)
    good = ad.score(items[0], f"*History* and *Culture* and *Food* {words}")
    assert good.reward == 1.0 and good.detail["strict"] == [True, True, True]
    bad = ad.score(items[0], f"*History*, *Culture* {words}")
    assert bad.reward == 0.0 and bad.detail["strict"] == [False, False, True]
    # a chatty first line breaks lowercase strictly; loose drops the first line and passes
    s = ad.score(items[1], "Sure! Here is the note:\nparis is the capital of france and a city of light.\n"
                           "p.s. bring a coat")
    assert s.detail == {"strict": [False, True], "loose": [True, True]}
    agg = ad.aggregate([good, bad, s])
    assert agg == pytest.approx({"prompt_strict": 1 / 3, "prompt_loose": 2 / 3, "inst_strict": 5 / 8,
                                 "inst_loose": 6 / 8})
    with pytest.raises(ValueError, match="2 kwargs"):
        check_row(["punctuation:no_comma"], [{}, {}], "x")
    with pytest.raises(KeyError, match="not implemented"):
        ad.load(_write_jsonl(tmp_path / "x.jsonl", [{**IFEVAL_ROWS[0], "instruction_id_list": ["made:up", "a", "b"]}]))


@pytest.mark.parametrize("iid,kw,yes,no", [
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a\n* b\n- c"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "one\n***\ntwo", "one\n***\n\n***\ntwo"),
    ("detectable_format:title", {}, "<<My Title>>\ntext", "My Title\ntext"),
    ("combination:two_responses", {}, "A cat.\n******\nA dog.", "A cat.\n******\nA cat."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?",
     "Any other questions? Done."),
    ("detectable_format:json_format", {}, "```json\n{\"a\": 1}\n```", "{a: 1}"),
    ("keywords:frequency", {"keyword": "fun", "frequency": 2, "relation": "at least"}, "fun and FUN", "fun only"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "zebra", "zizz"),
    ("keywords:forbidden_words", {"forbidden_words": ["bad"]}, "a badge is fine", "this is Bad."),
    ("keywords:existence", {"keywords": ["river", "stone"]}, "A Stone by the river.", "A stone."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"},
     "Dr. Smith came at 3.5 p.m. He left.", "One. Two. Three."),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "one two three four", "a b c d e"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "second"},
     "First para.\n\n\"Second, para.", "First para.\n\nThird para."),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nfoo\nSection 2\nbar", "Section 1\nonly"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THIS is BIG", "This is BIG"),
    ("change_case:english_capital", {}, "HELLO TO THE WORLD", "Hello to the world"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "[name] at [address]", "[name] only"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"}, "hi\nP.P.S. bye", "hi\nP.S. bye"),
    ("startend:quotation", {}, '"quoted"', 'not "quoted"'),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a poem"}, "Write a poem\nRoses...", "A poem: roses"),
    ("language:response_language", {"language": "de"}, "Das ist nicht gut und die Katze ist ein Tier.",
     "This is not good and the cat is an animal."),
])
def test_ifeval_instruction_checks(iid, kw, yes, no):
    assert check_instruction(iid, yes, kw) is True
    assert check_instruction(iid, no, kw) is False
    assert check_instruction(iid, "   ", kw) is False


HUMANEVAL_ROW = {
    "task_id": "HumanEval/0",
    "prompt": "from typing import List\n\n\ndef below_zero(operations: List[int]) -> bool:\n"
              "    \"\"\" Return True if the running balance ever drops below zero.\n"
              "    >>> below_zero([1, 2, -4])\n    True\n    \"\"\"\n",
    "canonical_solution": "    balance = 0\n    for op in operations:\n        balance += op\n"
                          "        if balance < 0:\n            return True\n    return False\n",
    "test": "\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate([]) == False\n"
            "    assert candidate([1, 2, -4, 5]) == True\n    assert candidate([1, -1, 2]) == False\n",
    "entry_point": "below_zero"}

MBPP_ROW = {"task_id": 11, "text": "Write a python function to remove first and last occurrence of a given character "
                                   "from the string.",
            "code": "def remove_Occ(s,ch): \r\n    s = s.replace(ch, '', 1)\r\n    i = s.rfind(ch)\r\n"
                    "    return s if i < 0 else s[:i] + s[i+1:] ",
            "test_list": ["assert remove_Occ(\"hello\",\"l\") == \"heo\"",
                          "assert remove_Occ(\"abcda\",\"a\") == \"bcd\""],
            "test_setup_code": "", "challenge_test_list": []}


def test_humaneval_program_assembly():
    body = HUMANEVAL_ROW["canonical_solution"]
    whole = ("```python\nfrom typing import List\ndef below_zero(ops):\n"
             "    return min([0] + [sum(ops[:i+1]) for i in range(len(ops))]) < 0\n```")
    for completion in (body, whole):
        prog = humaneval_program(HUMANEVAL_ROW["prompt"], completion, HUMANEVAL_ROW["test"], "below_zero")
        compile(prog, "<humaneval>", "exec")  # a valid program, never executed on the host
        assert prog.rstrip().endswith("check(below_zero)") and HUMANEVAL_ROW["test"] in prog


@needs_sandbox
def test_code_adapters_run_in_sandbox(tmp_path):
    he = get_adapter("humaneval", time_limit_s=5.0)
    gz = tmp_path / "HumanEval.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps(HUMANEVAL_ROW) + "\n")
    item = he.load(gz)[0]
    marker = tmp_path / "escaped.txt"
    evil = f"```python\ndef below_zero(o):\n    open({str(marker)!r}, 'w').write('x')\n    return False\n```"
    scores = he.score_many([item] * 3, [HUMANEVAL_ROW["canonical_solution"], "    return False\n", evil])
    assert [s.reward for s in scores] == [1.0, 0.0, 0.0]
    assert not marker.exists(), "model code reached the host file system"

    mb = get_adapter("mbpp", time_limit_s=1.0)
    item = mb.load(_write_jsonl(tmp_path / "mbpp.jsonl", [MBPP_ROW]))[0]
    assert "remove_Occ(\"hello\"" in item.messages[0]["content"]
    ok = mb.score(item, f"```python\n{MBPP_ROW['code']}\n```")
    loop = mb.score(item, "```python\ndef remove_Occ(s, ch):\n    while True: pass\n```")
    assert ok.reward == 1.0 and loop.reward == 0.0 and loop.detail["timed_out"]


TAU_TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": {k: {"type": "string"} for k in ks}, "required": ks}}}
    for n, d, ks in (("get_order", "look up an order", ["order_id"]),
                     ("cancel_order", "cancel a pending order", ["order_id", "reason"]))]
TAU_ROW = {"task_id": "retail-0", "user_id": "yusuf_1", "instruction": "Cancel order #W1, no longer needed.",
           "user_messages": ["Please cancel my order #W1.", "The reason: no longer needed."],
           "tools": TAU_TOOLS, "read_only_tools": ["get_order"],
           "tool_results": [{"name": "get_order", "arguments": {"order_id": "#W1"}, "output": {"status": "pending",
                                                                                            "total": "1,052.10"}},
                            {"name": "cancel_order", "output": "{\"status\": \"cancelled\"}"}],
           "actions": [{"name": "cancel_order", "kwargs": {"order_id": "#W1", "reason": "no longer needed"}}],
           "outputs": ["1052.10"], "max_turns": 6}


def _tau_script(turn: int, sample: int, messages: list[dict]) -> dict:
    """The scripted agent of TAU_ROW: look the order up, ask, cancel (wrong reason on odd samples), confirm."""
    if turn == 0:
        return {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.get_order:0", "type": "function",
                "function": {"name": "get_order", "arguments": {"order_id": "#W1"}}}]}
    if turn == 1:
        assert '"total": "1,052.10"' in [m for m in messages if m["role"] == "tool"][-1]["content"]
        return {"role": "assistant", "content": "Why do you want to cancel?"}
    if turn == 2:
        reason = "no longer needed" if sample % 2 == 0 else "other"
        args = json.dumps({"reason": reason, "order_id": "#W1"})
        return {"role": "assistant", "content": "", "tool_calls": [
            {"id": "functions.cancel_order:1", "type": "function",
             "function": {"name": "cancel_order", "arguments": args}}]}
    return {"role": "assistant", "content": "Cancelled; $1,052.10 will be refunded."}


class FakeGenerator:
    """Unit-test fake of a Generator: GSM8K/IFEval answers right exactly where `table[task][sample]` is
    1; tau episodes follow a script, calling cancel_order with the wrong reason on odd samples."""

    def __init__(self, table: dict[str, list[int]], n_items: int = 0):
        self.table, self.calls = table, 0

    def _tau(self, req: ChatRequest) -> dict:
        return _tau_script(req.seed % 1009, (req.seed // 1009) % 7919, req.messages)

    def chat(self, requests):
        out = []
        for r in requests:
            self.calls += 1
            text = r.messages[-1]["content"] if r.messages[-1]["role"] == "user" else ""
            if r.tools:
                out.append(Completion(message=self._tau(r)))
                continue
            sample, item = r.seed % 7919, r.seed // 7919
            ok = self.table[str(item)][sample]
            if "####" in text:
                answer = "#### 72" if ok else "#### 70"
            else:
                answer = f"*a* *b* *c* {' '.join(['w'] * 30)}" if ok else "a, b"
            out.append(Completion(message={"role": "assistant", "content": answer},
                                  finish_reason="length" if (item, sample) == (0, 0) else "stop"))
        return out


def test_tau_episode_rewards(tmp_path):
    from k2sys.eval.tau import run_chat_episode, tau_spec

    gen = FakeGenerator({})
    good = run_chat_episode(gen, tau_spec(TAU_ROW), seed=0, temperature=0.0)
    assert good["reward"] == 1.0 and good["turns"] == 4 and not good["truncated"]
    assert [m["role"] for m in good["messages"]] == ["user", "assistant", "tool", "assistant", "user", "assistant",
                                                    "tool", "assistant"]
    wrong = run_chat_episode(gen, tau_spec(TAU_ROW), seed=1, temperature=0.0)
    assert wrong["reward"] == 0.0 and wrong["info"]["actions_ok"] is False
    short = run_chat_episode(gen, tau_spec({**TAU_ROW, "max_turns": 3}), seed=0, temperature=0.0)
    assert short["truncated"] and short["reward"] == 0.0 and short["info"]["missing_outputs"] == ["1052.10"]
    with pytest.raises(Exception, match="not in 'tools'"):
        get_adapter("tau").load(_write_jsonl(tmp_path / "t.jsonl", [{**TAU_ROW, "actions": [{"name": "refund"}]}]))


# ------------------------------------------------------------------ end to end + compare

def _suite_files(tmp_path: Path, n_tasks: int) -> list[SuiteEntry]:
    gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": f"Q{i}: how many clips?", "answer": "... #### 72"}
                                                 for i in range(n_tasks)])
    ife = _write_jsonl(tmp_path / "ifeval.jsonl", [{**IFEVAL_ROWS[0], "key": 2000 + i} for i in range(n_tasks)])
    tau = _write_jsonl(tmp_path / "tau.jsonl", [{**TAU_ROW, "task_id": f"retail-{i}"} for i in range(2)])
    return [parse_suite_arg(f"gsm8k={gsm}"), parse_suite_arg(f"ifeval:if={ife}"),
            SuiteEntry(adapter="tau", path=str(tau))]


def _table(n_tasks: int, n: int, p: float, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    return {str(i): [int(rng.random() < p) for _ in range(n)] for i in range(n_tasks)}


def test_run_suite_end_to_end_matches_outcome_table(tmp_path):
    n, n_tasks = 4, 6
    table = _table(n_tasks, n, 0.5, seed=1)
    cfg = SamplingConfig(n=n, temperature=0.7, ks=(1, 2, 4), seed=0)
    res = run_suite(FakeGenerator(table), _suite_files(tmp_path, n_tasks), cfg, model="fake", out_dir=tmp_path / "a")
    expect = family_metrics({t: [float(x) for x in v] for t, v in table.items()}, [1, 2, 4])
    for fam in ("gsm8k", "if"):
        got = res["families"][fam]["metrics"]
        for k in ("avg@4", "pass@1", "pass@2", "pass@4"):
            assert got[k] == pytest.approx(expect[k]), (fam, k)
    assert res["families"]["if"]["metrics"]["prompt_strict"] == pytest.approx(expect["avg@4"])
    assert res["families"]["gsm8k"]["truncated"] == pytest.approx(1 / (n * n_tasks))
    tau = res["families"]["tau"]["metrics"]  # even samples right, odd samples wrong
    assert tau["avg@4"] == 0.5 and tau["pass@1"] == 0.5 and tau["pass@4"] == 1.0 and tau["turns"] == 4.0
    assert res["overall"]["macro"]["pass@1"] == pytest.approx((2 * expect["pass@1"] + 0.5) / 3)
    lines = (tmp_path / "a" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 2 * n * n_tasks + 2 * n
    assert load_results(tmp_path / "a" / "results.json")["families"]["gsm8k"]["tasks"] == \
        {t: [float(x) for x in v] for t, v in table.items()}
    with pytest.raises(ValueError, match="greedy samples are identical"):
        run_suite(FakeGenerator(table), _suite_files(tmp_path, 1), SamplingConfig(n=2, temperature=0.0, ks=(1,)))


def test_statistics_against_published_values():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the textbook example
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80, method 10: [0.0524, 0.3339]
    assert newcombe_interval(48, 80, 56, 70) == pytest.approx((0.0524, 0.3339), abs=1e-4)
    vals = [1.0] * 200 + [0.0] * 200
    lo, hi = bootstrap_ci(vals, resamples=4000)
    assert lo < 0.5 < hi and (hi - lo) == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 400), abs=0.01)
    d, lo, hi, n = paired_bootstrap_delta({"a": 0.0, "b": 1.0, "c": 0.0}, {"a": 1.0, "b": 1.0, "c": 1.0, "z": 0.0})
    assert n == 3 and d == pytest.approx(2 / 3) and 0 <= lo <= d <= hi <= 1


def test_compare_report_two_runs(tmp_path):
    from k2sys.eval.cli import main

    n_tasks, entries = 40, _suite_files(tmp_path, 40)
    cfg = SamplingConfig(n=2, temperature=0.7, ks=(1, 2))
    base = run_suite(FakeGenerator(_table(n_tasks, 2, 0.3, seed=2)), entries, cfg, model="sft", out_dir=tmp_path / "s")
    better = run_suite(FakeGenerator(_table(n_tasks, 2, 0.9, seed=3)), entries, cfg, model="rl", out_dir=tmp_path / "r")
    cmp = compare_results([base, base], ["a", "b"], resamples=300)
    assert all(r["deltas"]["b"]["delta"] == 0 and not r["deltas"]["b"]["significant"] for r in cmp["rows"])
    cmp = write_report([base, better], tmp_path / "report.md", resamples=500)
    row = next(r for r in cmp["rows"] if (r["family"], r["metric"]) == ("gsm8k", "pass@1"))
    want = better["families"]["gsm8k"]["metrics"]["pass@1"] - base["families"]["gsm8k"]["metrics"]["pass@1"]
    assert row["deltas"]["rl"]["delta"] == pytest.approx(want) and row["deltas"]["rl"]["significant"]
    assert row["deltas"]["rl"]["shared"] == n_tasks and row["values"]["sft"]["ci"] == "bootstrap"
    assert {r["family"] for r in cmp["rows"]} == {"gsm8k", "if", "tau", "overall"}
    md = (tmp_path / "report.md").read_text()
    assert f"| gsm8k | pass@1 | {base['families']['gsm8k']['metrics']['pass@1']:.3f}" in md
    assert f"{want:+.3f}" in md and "Δ rl − sft" in md and "inst_loose" in md
    png = tmp_path / "report.png"
    assert ("![comparison](report.png)" in md and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n") or \
        ("matplotlib is not installed" in md and not png.exists())
    zero = run_suite(FakeGenerator(_table(n_tasks, 2, 0.0, seed=4)), entries, cfg, model="zero")
    write_report([zero, zero], tmp_path / "zero.md", resamples=100)  # intervals pinned at 0: the plot still draws
    assert "| gsm8k | pass@1 | 0.000 [0.000, 0.088] |" in (tmp_path / "zero.md").read_text()
    # the CLI compare step on the results folders
    assert main(["compare", str(tmp_path / "s"), str(tmp_path / "r"), "--out", str(tmp_path / "cli.md"),
                 "--no-png", "--resamples", "200"]) == 0
    assert "| overall | avg@2 |" in (tmp_path / "cli.md").read_text()
    assert main(["compare", str(tmp_path / "report.md"), str(tmp_path / "s"), "--out", str(tmp_path / "x.md")]) == 2


def test_compare_reports_each_familys_response_cap(tmp_path):
    import copy

    entries = _suite_files(tmp_path, 8)
    cfg = SamplingConfig(n=2, temperature=0.7, ks=(1,), max_tokens=16)
    base = run_suite(FakeGenerator(_table(8, 2, 0.5, seed=5)), entries, cfg, model="sft")
    assert {f["max_tokens"] for f in base["families"].values()} == {16}
    md = render_markdown(compare_results([base, base], ["a", "b"], resamples=50))
    assert "max_tokens=16," in md and "per family" not in md
    longer = copy.deepcopy(base)
    longer["families"]["if"]["max_tokens"] = 96  # e.g. the recipe's instruction-following cap
    cmp = compare_results([base, longer], ["a", "b"], resamples=50)
    assert cmp["max_tokens"]["b"]["if"] == 96 and cmp["max_tokens"]["a"]["if"] == 16
    md = render_markdown(cmp)
    assert "- b: n=2, temperature=0.7, top_p=1.0, max_tokens per family: " in md and "if=96" in md
    assert any(n.startswith("if: runs used different max_tokens") for n in cmp["notes"])


class FakeEngine:
    """Unit-test fake InferenceEngine: answers a task right when its seed's sample index is below the
    task's count of correct answers in `correct`, else a wrong number."""

    def __init__(self, tok, tasks, correct):
        self.tok, self.tasks, self.correct = tok, tasks, correct

    def generate(self, reqs):
        from k2sys.engine.api.protocol import GenerateOutput

        out = []
        for r in reqs:
            text = self.tok.decode(list(r.input_ids), skip_special_tokens=False)
            ti = next(i for i, t in enumerate(self.tasks) if t.prompt in text)
            j = (r.sampling.sampling_seed - 1234) % 7919
            ans = self.tasks[ti].answer if j < self.correct[ti] else "99999"
            ids = list(self.tok.encode(ans).ids) + [r.sampling.stop_token_ids[0]]
            out.append(GenerateOutput(rid=r.rid, output_ids=tuple(ids), finish_reason="stop"))
        return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer

    return load_tokenizer(train_tokenizer(default_corpus(n=200), 600, tmp_path_factory.mktemp("tok")))


def test_engine_chat_generator_parses_or_keeps_raw_text(tok):
    from k2sys.eval.generators import EngineChatGenerator
    from k2sys.tasks import get_family

    tasks = get_family("arithmetic").generate(4, seed=0, split="heldout")
    # the chat generator over the fake engine: messages in, parsed assistant text out
    gen = EngineChatGenerator(FakeEngine(tok, tasks, [1] * 4), tok)
    comp = gen.chat([ChatRequest(messages=[{"role": "user", "content": tasks[2].prompt}], seed=1234)])[0]
    assert comp.text == tasks[2].answer and comp.finish_reason == "stop" and "malformed" not in comp.message
    # a stray tool-section token: the parser flags the turn malformed; raw_text keeps the decoded text as
    # generated (what an RL verifier scores)
    tool_tok = "<|tool_calls_section_begin|>"
    assert tok.token_to_id(tool_tok) is not None
    eng = FakeEngine(tok, tasks, [1] * 4)
    eng.tasks = [type(t)(prompt=t.prompt, answer=t.answer + tool_tok, family=t.family) for t in tasks]
    req = [ChatRequest(messages=[{"role": "user", "content": tasks[2].prompt}], seed=1234)]
    parsed = EngineChatGenerator(eng, tok).chat(req)[0]
    raw = EngineChatGenerator(eng, tok, raw_text=True).chat(req)[0]
    assert "malformed" in parsed.message
    assert raw.text == tasks[2].answer + tool_tok and "malformed" not in raw.message


class FakeOpenAIServer:
    """Unit-test fake of an OpenAI-compatible server (stdlib HTTP in a thread): /v1/models and
    /v1/chat/completions answering '#### 72' (a tool call when tools are given, 400 for 'TOO LONG'),
    one 503 first to exercise the retry; records the bodies."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.bodies, self.fail_next = [], 1
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if outer.fail_next:
                    outer.fail_next -= 1
                    return self._send(503, {"error": {"message": "warming up"}})
                outer.bodies.append(body)
                if body["messages"][-1]["content"] == "TOO LONG":
                    return self._send(400, {"error": {"message": "prompt is longer than the context"}})
                if body.get("tools"):
                    msg = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                           "function": {"name": "get_order", "arguments": "{\"order_id\": \"#W1\"}"}}]}
                    finish = "tool_calls"
                else:
                    msg, finish = {"role": "assistant", "content": "#### 72"}, "length" if body["seed"] % 2 else "stop"
                self._send(200, {"choices": [{"index": 0, "message": msg, "finish_reason": finish}],
                                 "usage": {"completion_tokens": 3}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_generator_wire_format_and_cli_run(tmp_path, capsys):
    from k2sys.eval.cli import main
    from k2sys.eval.generators import OpenAIChatGenerator

    srv = FakeOpenAIServer()
    try:
        gen = OpenAIChatGenerator(srv.url + "/v1", backoff_s=0.01)
        assert gen.model == "fake-model"
        history = [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "", "tool_calls": [
                       {"id": "c0", "type": "function",
                        "function": {"name": "get_order", "arguments": {"order_id": "#W0"}}}]},
                   {"role": "tool", "tool_call_id": "c0", "content": "{}"}]
        comp = gen.chat([ChatRequest(messages=history, tools=TAU_TOOLS, seed=3, max_tokens=7)])[0]
        sent = srv.bodies[-1]  # after one 503, retried
        assert sent["model"] == "fake-model" and sent["seed"] == 3 and sent["max_tokens"] == 7
        assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == "{\"order_id\": \"#W0\"}"
        assert comp.message["tool_calls"][0]["function"]["arguments"] == {"order_id": "#W1"}
        assert comp.finish_reason == "stop"
        bad = gen.chat([ChatRequest(messages=[{"role": "user", "content": "TOO LONG"}])] * 2)
        assert [c.finish_reason for c in bad] == ["error", "error"] and "longer than" in bad[0].usage["error"]
        gen.close()
        gsm = _write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": f"Q{i}?", "answer": "#### 72"} for i in range(3)])
        rc = main([srv.url, "--suite", f"gsm8k={gsm}", "--n", "2", "--temperature", "0.5", "--k", "1", "--k", "2",
                   "--out", str(tmp_path / "run"), "--name", "fake"])
    finally:
        srv.close()
    assert rc == 0
    res = load_results(tmp_path / "run" / "results.json")
    assert res["model"] == "fake" and res["families"]["gsm8k"]["metrics"]["pass@2"] == 1.0
    assert res["families"]["gsm8k"]["truncated"] == 0.5  # odd seeds came back finish_reason=length
    assert re.search(r"^gsm8k +avg@2=1\.0000  pass@1=1\.0000", capsys.readouterr().out, re.MULTILINE)
    assert main(["/no/such/ckpt", "--suite", f"gsm8k={gsm}", "--out", str(tmp_path / "x")]) == 2


class FakeTauEngine:
    """Unit-test fake InferenceEngine for the token-level agent loop: decodes the conversation so far and
    answers with the tokens of _tau_script's next assistant turn (sample 0: the right calls)."""

    def __init__(self, tok):
        self.tok = tok

    async def async_generate(self, reqs):
        from k2sys.engine.api.protocol import GenerateOutput
        from k2sys.tokenizer import parse_chat, render_chat

        (req,) = reqs
        text = self.tok.decode(list(req.input_ids), skip_special_tokens=False)
        messages, tools, _ = parse_chat(text[: text.rindex("<|im_assistant|>")])
        act = _tau_script(sum(m["role"] == "assistant" for m in messages), 0, messages)
        if isinstance(act.get("tool_calls", [{}])[0].get("function", {}).get("arguments"), str):
            act["tool_calls"][0]["function"]["arguments"] = json.loads(act["tool_calls"][0]["function"]["arguments"])
        body = render_chat(messages + [act], tools)[len(render_chat(messages, tools)):]
        body = body[len("<|im_assistant|>assistant<|im_middle|>"):-len("<|im_end|>")]
        ids = self.tok.encode(body).ids + [self.tok.token_to_id("<|im_end|>")]
        return [GenerateOutput(rid=req.rid, output_ids=tuple(ids), output_logprobs=tuple([0.0] * len(ids)),
                               finish_reason="stop")]
