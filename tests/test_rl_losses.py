"""The K2 + PTX loss the trainer runs, and stale-token correction, against formulas written out here."""

import math

import pytest
import torch

from k2sys.coordinator.rl_batch import Sample, build_rl_batch
from k2sys.rl.losses import K2PTXLoss, StalePolicyConfig, correct_stale_tokens, logprob_mismatch


def reference_k2(lp, old, r, gid, tau, w=None):
    """The issue's formula, loop by loop, in Python floats."""
    groups = {}
    for i, g in enumerate(gid):
        groups.setdefault(g, []).append(i)
    total = 0.0
    for idx in groups.values():
        mean_r = sum(r[i] for i in idx) / len(idx)
        s = 0.0
        for i in idx:
            res = r[i] - mean_r - tau * (lp[i] - old[i])
            s += (1.0 if w is None else w[i]) * res * res
        total += s / len(idx)
    return total / len(groups)


def rl_inputs(seed=0, sizes=(3, 1, 5, 2), n_ptx=2, n_critic=1, lam=0.3, mu=0.2):
    """Random scored samples of groups of unequal sizes (interleaved), PTX and critic rows, and the
    trainer batch build_rl_batch makes of them."""
    g = torch.Generator().manual_seed(seed)
    gids = [gid for gid, k in zip([7, -2, 40, 3], sizes) for _ in range(k)]
    gids = [gids[i] for i in torch.randperm(len(gids), generator=g).tolist()]

    def ints(n):
        return torch.randint(1, 50, (n,), generator=g).tolist()
    samples = []
    for gid in gids:
        p, r = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        samples.append(Sample(group_id=gid, family="f", prompt_tokens=ints(p), response_tokens=ints(r),
                              logprobs=(-torch.rand(r, generator=g) * 3).tolist(), versions=[4] * r,
                              reward=float(torch.rand(1, generator=g) > 0.5)))

    def rows(n):
        out = []
        for _ in range(n):
            k = int(torch.randint(4, 9, (1,), generator=g))
            out.append((ints(k), [0, 0] + [1] * (k - 2)))
        return out
    ptx, critic = rows(n_ptx), rows(n_critic)
    batch, _ = build_rl_batch(samples, 0, 4, StalePolicyConfig(mode="none"), ptx or None, lam if ptx else 0.0,
                              critic_rows=critic or None, critic_coef=mu if critic else 0.0)
    return samples, ptx, critic, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def reference_total(samples, ptx, critic, lp_tok, tau, lam, mu):
    """L_K2 (reference_k2 over each response's summed log-probs) + lam * PTX CE + mu * critic CE, from the
    samples and rows themselves (positions recomputed here): response token j of a prompt of p tokens
    is predicted at position p + j - 1; a row's target t + 1 at position t."""
    seq = [sum(lp_tok[i][len(s_.prompt_tokens) + j - 1] for j in range(len(s_.response_tokens)))
           for i, s_ in enumerate(samples)]
    old = [sum(s_.logprobs) for s_ in samples]
    k2 = reference_k2(seq, old, [s_.reward for s_ in samples], [s_.group_id for s_ in samples], tau)

    def ce(rows, first):
        terms = [-lp_tok[first + j][t] for j, (_, m) in enumerate(rows) for t in range(len(m) - 1) if m[t + 1]]
        return sum(terms) / len(terms) if terms else 0.0
    n = len(samples)
    return k2 + lam * ce(ptx, n) + mu * ce(critic, n + len(ptx))


def token_logprobs(batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(batch["tokens"].shape, generator=g, dtype=torch.float64) * 4


@pytest.mark.parametrize("tau", [0.05, 1.0, 3.0])
def test_the_trained_loss_is_the_k2_formula_plus_ptx_and_critic(tau):
    """The loss MegatronBackend trains with, on a batch of unequal interleaved groups, equals the
    paper's formula written out loop by loop (reference_k2) plus the two cross-entropies."""
    samples, ptx, critic, batch = rl_inputs()
    lp = token_logprobs(batch)
    loss_sum, denom = K2PTXLoss(tau)(lp, batch)
    want = reference_total(samples, ptx, critic, lp.tolist(), tau, 0.3, 0.2)
    assert math.isclose((loss_sum / denom).item(), want, rel_tol=1e-6)  # the batch columns are float32
    # no PTX or critic rows: L_K2 alone
    samples, _, _, batch = rl_inputs(seed=3, n_ptx=0, n_critic=0)
    lp = token_logprobs(batch, 2)
    loss_sum, denom = K2PTXLoss(tau)(lp, batch)
    assert math.isclose((loss_sum / denom).item(), reference_total(samples, [], [], lp.tolist(), tau, 0, 0),
                        rel_tol=1e-6)


def test_the_trained_loss_is_the_same_for_any_micro_batch_split():
    """sum(loss_sum) / sum(denom) over any split of the rows (micro-batches, data-parallel ranks) is the
    whole batch's loss: the trainer may cut the batch anywhere."""
    _, _, _, batch = rl_inputs(seed=5)
    lp = token_logprobs(batch, 6)
    fn = K2PTXLoss(0.7)
    whole = fn(lp, batch)
    B = lp.shape[0]
    for cuts in ([0, 1, B], [0, 4, 7, B], list(range(B + 1))):
        parts = [fn(lp[a:b], {k: v[a:b] for k, v in batch.items()}) for a, b in zip(cuts, cuts[1:])]
        got = sum(p[0] for p in parts) / sum(p[1] for p in parts)
        assert math.isclose(got.item(), (whole[0] / whole[1]).item(), rel_tol=1e-9)


def test_the_trained_loss_gradient():
    """gradcheck, and the closed form: every policy token of response i gets -2 tau res_i / (G K_g)."""
    samples, _, _, batch = rl_inputs(seed=7, n_ptx=0, n_critic=0)
    lp = token_logprobs(batch, 8).requires_grad_(True)
    tau = 0.4
    fn = K2PTXLoss(tau)
    assert torch.autograd.gradcheck(lambda x: fn(x, batch)[0] / fn(x, batch)[1], (lp,))
    loss_sum, denom = fn(lp, batch)
    (loss_sum / denom).backward()
    gids = [s.group_id for s in samples]
    G = len(set(gids))
    for i, s in enumerate(samples):
        members = [j for j, g in enumerate(gids) if g == gids[i]]
        mean_r = sum(samples[j].reward for j in members) / len(members)
        p, r = len(s.prompt_tokens), len(s.response_tokens)
        seq = float(lp.detach()[i, p - 1:p - 1 + r].sum())
        res = s.reward - mean_r - tau * (seq - sum(s.logprobs))
        want = -2 * tau * res / (G * len(members))
        assert torch.allclose(lp.grad[i, p - 1:p - 1 + r], torch.full((r,), want, dtype=torch.float64), rtol=1e-6)
        outside = torch.ones(lp.shape[1], dtype=torch.bool)
        outside[p - 1:p - 1 + r] = False
        assert float(lp.grad[i][outside].abs().sum()) == 0.0  # prompt and padding get nothing


def test_on_policy_the_trained_loss_is_the_mean_group_variance():
    # lp == old on every response: the K2 loss is the mean over prompts of the (population) reward variance
    samples, _, _, batch = rl_inputs(seed=9, n_ptx=0, n_critic=0)
    lp = batch["behaviour_lp"].double()  # the engine's own log-probs: pi_theta = pi_old
    loss_sum, denom = K2PTXLoss(2.0)(lp, batch)
    by: dict = {}
    for s in samples:
        by.setdefault(s.group_id, []).append(s.reward)
    var = [torch.tensor(v).var(unbiased=False).item() for v in by.values()]
    assert math.isclose((loss_sum / denom).item(), sum(var) / len(var), rel_tol=1e-6)


@pytest.mark.parametrize("tau", [0.0, -1.0, float("nan"), float("inf")])
def test_the_trained_loss_refuses_a_bad_tau(tau):
    with pytest.raises(ValueError, match="tau"):
        K2PTXLoss(tau)


def test_stale_mask_mode_drops_tokens_beyond_max_staleness():
    versions = torch.tensor([[3, 3, 4, 5, 5], [5, 5, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    out = correct_stale_tokens(StalePolicyConfig(mode="mask", max_staleness=1), versions, 5, mask)
    assert out.mask.tolist() == [[False, False, True, True, True], [True, True, True, False, False]]
    assert out.num_stale_tokens == 3 and out.num_masked_tokens == 2 and out.weights is None
    out0 = correct_stale_tokens(StalePolicyConfig(mode="mask", max_staleness=0), versions, 5, mask)
    assert out0.mask[0].tolist() == [False, False, False, True, True]
    none = correct_stale_tokens(StalePolicyConfig(mode="none"), versions, 5, mask)
    assert torch.equal(none.mask, mask.bool())
    with pytest.raises(ValueError, match="newer"):
        correct_stale_tokens(StalePolicyConfig(), versions, 4, mask)


def test_stale_importance_mode_weights_are_truncated_sequence_ratios():
    versions = torch.tensor([[1, 1, 2], [2, 2, 2], [0, 0, 2]])
    mask = torch.ones(3, 3, dtype=torch.long)
    beh = torch.tensor([[-1.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-3.0, -3.0, -1.0]], dtype=torch.float64)
    old = torch.tensor([[-1.5, -1.0, -9.0], [-5.0, -5.0, -5.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    out = correct_stale_tokens(StalePolicyConfig(mode="importance", is_clip=2.0), versions, 2, mask,
                               behaviour_logprobs=beh, old_logprobs=old)
    # row 0: stale tokens 0,1: exp(-0.5 + 1.0); row 1: nothing stale -> 1; row 2: exp(4) clipped to 2
    assert torch.allclose(out.weights, torch.tensor([math.exp(0.5), 1.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        correct_stale_tokens(StalePolicyConfig(mode="importance"), versions, 2, mask)


@pytest.mark.parametrize("kwargs,needle", [(dict(mode="clip"), "mode"), (dict(max_staleness=-1), "max_staleness"),
                                           (dict(is_clip=0.0), "is_clip")])
def test_stale_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        StalePolicyConfig(**kwargs)


def test_logprob_mismatch():
    e = torch.tensor([[-1.0, -2.0, 0.0]])
    t = torch.tensor([[-1.1, -2.0, 5.0]])
    m = torch.tensor([[1, 1, 0]])
    out = logprob_mismatch(e, t, m)
    assert out["tokens"] == 2
    assert out["mean_abs"] == pytest.approx(0.05) and out["max_abs"] == pytest.approx(0.1)
    # k3 = mean(exp(t-e) - 1 - (t-e)) over masked tokens
    assert out["kl_k3"] == pytest.approx((math.exp(-0.1) - 1 + 0.1) / 2)
    assert logprob_mismatch(e, e, m)["kl_k3"] == 0.0
