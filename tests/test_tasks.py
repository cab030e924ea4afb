import re
from fractions import Fraction

import pytest

from k2sys.tasks import Task, evaluate_expression, get_family, list_families, split_of

FAMILIES = ["arithmetic", "countdown", "list_ops"]


def test_registry():
    assert set(FAMILIES) <= set(list_families())
    with pytest.raises(KeyError, match="registered"):
        get_family("sudoku")
    assert get_family("arithmetic", digits=3).params()["digits"] == 3


@pytest.mark.parametrize("name", FAMILIES)
def test_generation_is_seeded_and_splits_are_disjoint(name):
    fam = get_family(name)
    a, b = fam.generate(40, seed=1), fam.generate(40, seed=1)
    assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
    assert [t.prompt for t in fam.generate(40, seed=2)] != [t.prompt for t in a]
    train = {t.prompt for s in range(3) for t in fam.generate(60, seed=s, split="train")}
    held = {t.prompt for s in range(3) for t in fam.generate(30, seed=s, split="heldout")}
    assert train and held and not (train & held)
    assert all(split_of(name, p) == "heldout" for p in held)
    assert len({t.prompt for t in a}) == 40  # distinct within a call
    with pytest.raises(ValueError, match="split"):
        fam.generate(1, seed=0, split="test")


@pytest.mark.parametrize("name", FAMILIES)
def test_expert_solutions_verify_and_tasks_roundtrip(name):
    fam = get_family(name)
    for t in fam.generate(50, seed=0) + fam.generate(20, seed=0, split="heldout"):
        assert fam.verify(t, fam.expert_solution(t)) == 1.0
        assert fam.verify(t, "  " + fam.expert_solution(t) + "\n") == 1.0  # surrounding whitespace is fine
        assert fam.verify(t, fam.expert_solution(t) + " done") == 0.0       # extra text is not
        assert Task.from_dict(t.to_dict()) == t


def test_arithmetic_answers_against_python_and_strictness():
    fam = get_family("arithmetic", digits=3, ops="+-*")
    for t in fam.generate(60, seed=3):
        a, op, b = re.fullmatch(r"(\d+)([+\-*])(\d+)=", t.prompt).groups()
        assert 100 <= int(a) <= 999 and 100 <= int(b) <= 999
        want = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert t.answer == str(want)
    t = Task(prompt="12+35=", answer="47", family="arithmetic")
    fam = get_family("arithmetic")
    for bad in ["047", "+47", "47.0", "= 47", "The answer is 47", "47\n47", "4 7", "", "48"]:
        assert fam.verify(t, bad) == 0.0, bad
    assert all(int(t.answer) >= 0 for t in get_family("arithmetic", allow_negative=False).generate(50, seed=0))


def test_list_ops_against_independent_reference_and_strictness():
    fam = get_family("list_ops", length=6)
    for t in fam.generate(60, seed=4):
        op, *rest = t.prompt[:-1].split(" ")
        items = [int(x) for x in rest]
        if op == "rev":
            want = list(reversed(items))
        elif op == "sort":
            want = sorted(items)
        else:
            want, seen = [], set()
            for x in items:
                if x not in seen:
                    seen.add(x)
                    want.append(x)
        assert t.answer == " ".join(map(str, want)) and len(items) == 6
    t = Task(prompt="sort 3 1 2=", answer="1 2 3", family="list_ops")
    for bad in ["1,2,3", "1  2 3", "[1, 2, 3]", "3 2 1", "1 2 3 4"]:
        assert fam.verify(t, bad) == 0.0, bad


def test_countdown_generation_and_alternative_answers():
    fam = get_family("countdown", num_count=4, max_number=12)
    for t in fam.generate(40, seed=5):
        nums, target = t.meta["numbers"], t.meta["target"]
        assert len(nums) == 4 and all(1 <= n <= 12 for n in nums) and target >= 1
        assert t.prompt == f"{' '.join(map(str, nums))}->{target}="
        assert eval(t.answer) == target  # trusted generator output; an independent evaluator
    t = Task(prompt="3 5 7->26=", answer="3*7+5", family="countdown",
             meta={"numbers": [3, 5, 7], "target": 26})
    fam = get_family("countdown")
    assert fam.verify(t, "5+7*3") == 1.0 and fam.verify(t, "(7*3)+5") == 1.0
    for bad in ["26", "3*7+5+0", "3*7+5*1", "7*3+5=26", "-3+7*3+8", "3*7+6", "3**2+17",
                "__import__('os')", "3*7+5;", "3*(7+5)"]:
        assert fam.verify(t, bad) == 0.0, bad
    loose = Task(prompt="3 5 7->10=", answer="3+7", family="countdown",
                 meta={"numbers": [3, 5, 7], "target": 10, "use_all": False})
    assert fam.verify(loose, "3+7") == 1.0 and fam.verify(loose, "5+5") == 0.0


def test_countdown_division_is_exact_and_safe():
    fam = get_family("countdown", ops="+-*/")
    for t in fam.generate(40, seed=6):
        assert fam.verify(t, t.answer) == 1.0
    assert evaluate_expression("(8/3)*3") == (Fraction(8), [8, 3, 3])
    t = Task(prompt="3 3 8->8=", answer="8/3*3", family="countdown",
             meta={"numbers": [3, 3, 8], "target": 8, "ops": "+-*/"})
    assert fam.verify(t, "(8/3)*3") == 1.0
    assert fam.verify(t, "8/(3-3)") == 0.0  # division by zero scores 0, never raises
    with pytest.raises(ValueError):
        evaluate_expression("1" * 300)
    with pytest.raises(ValueError, match="not allowed"):
        evaluate_expression("2/1", ops="+-*")


def test_difficulty_validation_and_exhaustion():
    with pytest.raises(ValueError, match="digits"):
        get_family("arithmetic", digits=0)
    with pytest.raises(ValueError, match="ops"):
        get_family("arithmetic", ops="^")
    with pytest.raises(ValueError, match="num_count"):
        get_family("countdown", num_count=1)
    with pytest.raises(ValueError, match="ops"):
        get_family("list_ops", ops=["shuffle"])
    with pytest.raises(ValueError, match="found only"):
        get_family("arithmetic", digits=1, ops="+").generate(500, seed=0)
    fam = get_family("arithmetic")
    with pytest.raises(ValueError, match="family"):
        fam.verify(Task(prompt="x", answer="y", family="list_ops"), "y")
