import pytest
import torch

from k2sys.rl.budget import BudgetConfig, BudgetController


def controller(**kw):
    return BudgetController(BudgetConfig(budgets={"arithmetic": 4, "countdown": 8}, penalty=0.5, **kw))


def test_truncation_marks_over_budget_and_unfinished_at_budget():
    bc = controller()
    res = bc.truncate(
        ["arithmetic", "arithmetic", "arithmetic", "countdown", "countdown"],
        [[1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4, 5, 6], [1] * 8, [2] * 3],
        [True, False, False, True, True])
    assert res.truncated == [False, True, True, False, False]
    assert res.tokens[2] == [1, 2, 3, 4] and res.tokens[0] == [1, 2, 3] and res.tokens[3] == [1] * 8
    assert res.fraction_truncated == pytest.approx(2 / 5)
    assert res.fraction_by_type == {"arithmetic": pytest.approx(2 / 3), "countdown": 0.0}
    assert res.stats()["budget/fraction_truncated"] == pytest.approx(0.4)


def test_penalty_is_subtracted_only_from_truncated():
    bc = controller()
    r = bc.penalize(torch.tensor([1.0, 0.0, 1.0]), [False, True, True])
    assert r.tolist() == [1.0, -0.5, 0.5]
    assert bc.penalize([1.0], [False]).tolist() == [1.0]
    with pytest.raises(ValueError, match="rewards"):
        bc.penalize([1.0, 0.0], [True])


def test_unknown_type_and_default_budget():
    with pytest.raises(KeyError, match="default_budget"):
        controller().max_new_tokens("list_ops")
    assert controller(default_budget=16).max_new_tokens("list_ops") == 16


@pytest.mark.parametrize("kw,needle", [(dict(budgets={"a": 0}), "budgets"), (dict(penalty=-1.0), "penalty"),
                                       (dict(default_budget=0), "default_budget")])
def test_config_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        BudgetConfig(**kw)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="finished"):
        controller().truncate(["arithmetic"], [[1]], [])
