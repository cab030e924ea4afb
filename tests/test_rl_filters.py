import itertools
import math

import pytest

from k2sys.rl.filters import DifficultyFilter, pass_at_k


def brute_pass_at_k(n, c, k):
    """Probability that a uniformly random k-subset of the n samples holds a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 5, 3), (6, 2, 1), (6, 2, 3), (8, 3, 4), (7, 1, 7), (4, 1, 2)])
def test_unbiased_estimator_matches_enumeration(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_large_n_is_stable():
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-9)


@pytest.mark.parametrize("args,needle", [((0, 0, 1), "n"), ((4, 5, 1), "c"), ((4, 1, 5), "k"), ((4, 1, 0), "k")])
def test_bad_arguments(args, needle):
    with pytest.raises(ValueError, match=needle):
        pass_at_k(*args)


def test_filter_keeps_moderate_prompts():
    f = DifficultyFilter(k=1, low=0.1, high=0.9)
    res = f([8, 8, 8, 8], [0, 8, 4, 1])
    assert res.keep == [2, 3] and res.too_hard == 1 and res.too_easy == 1
    assert res.pass_at_k == pytest.approx([0.0, 1.0, 0.5, 0.125])
    assert res.stats()["filter/kept_fraction"] == 0.5
    # k=4: one correct in eight gives pass@4 = 0.5
    assert DifficultyFilter(k=4, low=0.1, high=0.6)([8], [1]).keep == [0]


@pytest.mark.parametrize("kw,needle", [(dict(low=0.8, high=0.2), "low"), (dict(k=0), "k")])
def test_filter_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        DifficultyFilter(**kw)
