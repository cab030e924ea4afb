"""The policy critic's refresh rows have their own loss weight (rl.critic_coef), independent of the PTX term:

- the loss equals L_K2 + lambda * CE(PTX rows) + mu * CE(critic rows), each cross-entropy a mean over its
  own rows' loss tokens (independent reference), under any micro-batch split;
- with rl.ptx_coef = 0 the critic rows still train (gradient on their verdict tokens, none elsewhere);
- bad coefficients are refused naming the field.
"""

import math
import random

import pytest
import torch
from test_rl_losses import reference_k2

from k2sys.config import ConfigError, apply_overrides
from k2sys.coordinator.rl_batch import Sample, build_rl_batch
from k2sys.rl.losses import K2PTXLoss
from k2sys.coordinator.sections import RLSection
from k2sys.rl import StalePolicyConfig


def _samples(rng):
    out = []
    for g in range(2):
        for _ in range(3):
            n = rng.randrange(2, 5)
            out.append(Sample(group_id=g, family="f", prompt_tokens=[rng.randrange(1, 50) for _ in range(3)],
                              response_tokens=[rng.randrange(1, 50) for _ in range(n)],
                              logprobs=[-rng.random() for _ in range(n)], versions=[0] * n,
                              reward=float(rng.random() < 0.5)))
    return out


def _rows(rng, specs):
    return [([rng.randrange(1, 50) for _ in range(len(m))], m) for m in specs]


def test_loss_is_k2_plus_ptx_plus_critic_terms_under_any_split():
    rng = random.Random(0)
    samples = _samples(rng)
    ptx = _rows(rng, [[0, 0, 1, 1, 1, 1], [0, 1, 1]])
    critic = _rows(rng, [[0, 0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0, 0, 1]])  # one verdict token each
    lam, mu, tau = 0.3, 0.7, 0.2
    batch, stats = build_rl_batch(samples, 0, 0, StalePolicyConfig(mode="none"), ptx, lam,
                                  critic_rows=critic, critic_coef=mu)
    assert (stats["ptx_rows"], stats["critic_rows"], stats["samples"]) == (2, 3, 6)
    B, T = batch["tokens"].shape
    lp = -torch.rand(B, T, dtype=torch.float64)
    b64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    n = len(samples)
    seq = torch.stack([(lp[i] * batch["loss_mask"][i]).sum() for i in range(n)])
    old = torch.tensor([sum(s.logprobs) for s in samples], dtype=torch.float64)
    ref_rl = torch.tensor(reference_k2(seq.tolist(), old.tolist(), [s.reward for s in samples],
                                       [s.group_id for s in samples], tau), dtype=torch.float64)

    def ce(rows, start):  # mean NLL over the rows' target tokens (mask shifted: token t+1 predicted at t)
        tot, cnt = 0.0, 0
        for r, (_, m) in enumerate(rows):
            for t in range(len(m) - 1):
                if m[t + 1]:
                    tot -= float(lp[start + r, t])
                    cnt += 1
        return tot / cnt

    want = float(ref_rl) + lam * ce(ptx, n) + mu * ce(critic, n + len(ptx))
    fn = K2PTXLoss(tau)
    total, denom = fn(lp, b64)
    assert float(total / denom) == pytest.approx(want, rel=1e-6)  # float32 batch columns
    parts = [slice(0, 5), slice(5, 8), slice(8, B)]
    s_sum = sum(fn(lp[p], {k: v[p] for k, v in b64.items()})[0] for p in parts)
    d_sum = sum(fn(lp[p], {k: v[p] for k, v in b64.items()})[1] for p in parts)
    assert float(s_sum / d_sum) == pytest.approx(want, rel=1e-6)  # float32 batch columns


def test_critic_rows_train_without_ptx():
    rng = random.Random(1)
    samples = _samples(rng)
    critic = _rows(rng, [[0, 0, 0, 1], [0, 0, 1, 1]])
    batch, stats = build_rl_batch(samples, 0, 0, StalePolicyConfig(mode="none"), None, 0.0,
                                  critic_rows=critic, critic_coef=0.5)
    assert stats["ptx_rows"] == 0 and stats["critic_rows"] == 2
    n = len(samples)
    B, T = batch["tokens"].shape
    lp = (-torch.rand(B, T, dtype=torch.float64)).requires_grad_()
    total, denom = K2PTXLoss(0.1)(lp, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
    (total / denom).backward()
    g = lp.grad[n:]
    targets = torch.zeros(2, T, dtype=torch.float64)
    targets[0, 2], targets[1, 1], targets[1, 2] = 1, 1, 1  # verdict tokens, predicted one position earlier
    assert torch.allclose(g, -0.5 / 3 * targets)  # mu / (critic tokens) on each, nothing elsewhere
    # the same rows at critic_coef = 0 get no gradient: nothing is trained on them
    batch0, _ = build_rl_batch(samples, 0, 0, StalePolicyConfig(mode="none"), None, 0.0, critic_rows=critic)
    assert float(batch0["ptx_w"][n:].abs().sum()) == 0.0


@pytest.mark.parametrize("coef", [-0.1, math.nan, math.inf])
def test_bad_critic_coef_refused(coef):
    with pytest.raises(ValueError, match="critic_coef"):
        build_rl_batch(_samples(random.Random(2)), 0, 0, StalePolicyConfig(mode="none"), None, 0.0,
                       critic_rows=[([1, 2, 3], [0, 0, 1])], critic_coef=coef)
    with pytest.raises(ConfigError, match="rl.critic_coef"):
        RLSection(critic_coef=coef).validate()


def test_critic_coef_is_a_recipe_setting():
    from k2sys.recipes import get_recipe

    cfg = apply_overrides(get_recipe("tiny-k2"), ["rl.critic_coef=0.25", "rl.ptx_coef=0"])
    assert (cfg.rl.critic_coef, cfg.rl.ptx_coef) == (0.25, 0.0)
    RLSection().validate()
    with pytest.raises(ConfigError, match="rl.critic_coef"):
        apply_overrides(get_recipe("tiny-k2"), ["rl.critic_coef=-1"]).validate()
