"""K2 policy loss, PTX loss and stale-token correction against formulas written out here."""

import math

import pytest
import torch
import torch.nn.functional as F

from k2sys.rl.losses import (StalePolicyConfig, correct_stale_tokens, k2_policy_loss, logprob_mismatch,
                             ptx_loss, sequence_logprobs, total_loss)


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


def batch(seed=0, sizes=(3, 1, 5, 2)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.full((k,), gid) for gid, k in zip([7, -2, 40, 3], sizes)])
    ids = ids[torch.randperm(len(ids), generator=g)]  # groups interleaved, not contiguous
    n = len(ids)
    lp = -torch.rand(n, generator=g, dtype=torch.float64) * 20
    old = lp + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    r = (torch.rand(n, generator=g, dtype=torch.float64) > 0.5).double()
    return lp, old, r, ids


@pytest.mark.parametrize("tau", [0.05, 1.0, 3.0])
def test_k2_loss_matches_formula_unequal_groups(tau):
    lp, old, r, ids = batch()
    got = k2_policy_loss(lp, old, r, ids, tau)
    want = reference_k2(lp.tolist(), old.tolist(), r.tolist(), ids.tolist(), tau)
    assert got.dim() == 0
    assert math.isclose(got.item(), want, rel_tol=1e-12)


def test_k2_loss_weights_and_float32():
    lp, old, r, ids = batch(1)
    w = torch.rand(len(lp), dtype=torch.float64)
    want = reference_k2(lp.tolist(), old.tolist(), r.tolist(), ids.tolist(), 0.5, w.tolist())
    assert math.isclose(k2_policy_loss(lp, old, r, ids, 0.5, weights=w).item(), want, rel_tol=1e-12)
    got32 = k2_policy_loss(lp.float(), old.float(), r.float(), ids, 0.5, weights=w.float())
    assert got32.dtype == torch.float32 and math.isclose(got32.item(), want, rel_tol=1e-4)


def test_k2_loss_on_policy_equals_mean_group_variance():
    # lp == old: the loss is the mean over prompts of the (population) variance of rewards.
    lp, _, r, ids = batch(2)
    var = [r[ids == g].var(unbiased=False).item() for g in ids.unique()]
    assert math.isclose(k2_policy_loss(lp, lp.clone(), r, ids, 0.7).item(), sum(var) / len(var), rel_tol=1e-12)


def test_k2_loss_gradcheck_and_analytic_gradient():
    lp, old, r, ids = batch(3)
    lp.requires_grad_(True)
    tau = 0.4
    assert torch.autograd.gradcheck(lambda x: k2_policy_loss(x, old, r, ids, tau), (lp,))
    w = torch.rand(len(lp), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: k2_policy_loss(x, old, r, ids, tau, weights=w), (lp,))
    # dL/dlp_i = -2 tau res_i / (G K_g)
    k2_policy_loss(lp, old, r, ids, tau).backward()
    G = len(ids.unique())
    for i in range(len(lp)):
        same = ids == ids[i]
        res = r[i] - r[same].mean() - tau * (lp[i] - old[i])
        assert math.isclose(lp.grad[i].item(), (-2 * tau * res / (G * same.sum())).item(), rel_tol=1e-10)


def test_old_logprobs_get_no_gradient():
    lp, old, r, ids = batch(4)
    old.requires_grad_(True)
    lp.requires_grad_(True)
    k2_policy_loss(lp, old, r, ids, 1.0).backward()
    assert old.grad is None


def test_minimising_k2_loss_reaches_the_closed_form_optimum():
    # Optimum: tau * (lp - old) = r - mean_g r for every response (loss 0).
    lp, old, r, ids = batch(5)
    x = lp.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=5.0)
    tau = 0.5
    for _ in range(400):
        opt.zero_grad()
        k2_policy_loss(x, old, r, ids, tau).backward()
        opt.step()
    base = torch.stack([r[ids == g].mean() for g in ids])
    assert torch.allclose(tau * (x.detach() - old), r - base, atol=1e-6)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(old_logprobs=torch.zeros(4)), "old_logprobs"),
    (dict(rewards=torch.zeros(5)), "rewards"),
    (dict(group_ids=torch.zeros(4, dtype=torch.long)), "group_ids"),
    (dict(group_ids=torch.zeros(3)), "group_ids"),
    (dict(tau=0.0), "tau"),
    (dict(tau=-1.0), "tau"),
    (dict(logprobs=torch.zeros(3, 2)), "logprobs"),
    (dict(weights=-torch.ones(3)), "weights"),
    (dict(weights=torch.ones(2)), "weights"),
])
def test_k2_loss_rejects_bad_inputs_naming_the_argument(kwargs, needle):
    args = dict(logprobs=torch.zeros(3), old_logprobs=torch.zeros(3), rewards=torch.zeros(3),
                group_ids=torch.zeros(3, dtype=torch.long), tau=1.0)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=needle):
        k2_policy_loss(**args)


def test_sequence_logprobs_masks_padding_even_if_nan():
    tok = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, float("nan"), float("nan")]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.equal(sequence_logprobs(tok, mask), torch.tensor([-3.0, -0.5]))
    with pytest.raises(ValueError, match="mask"):
        sequence_logprobs(tok, mask[:, :2])


def test_ptx_loss_matches_cross_entropy_with_ignore_index():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    want = F.cross_entropy(logits.reshape(-1, 11), labels.masked_fill(mask == 0, -100).reshape(-1),
                           ignore_index=-100)
    got = ptx_loss(logits, labels, mask)
    assert math.isclose(got.item(), want.item(), rel_tol=1e-12)
    assert torch.autograd.gradcheck(lambda x: ptx_loss(x, labels, mask), (logits,))
    with pytest.raises(ValueError, match="mask"):
        ptx_loss(logits, labels, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="labels"):
        ptx_loss(logits, labels[:, :4], mask)


def test_total_loss():
    rl, ptx = torch.tensor(2.0), torch.tensor(3.0)
    assert total_loss(rl, ptx, 0.1).item() == pytest.approx(2.3)
    assert total_loss(rl, None, 0.0) is rl
    with pytest.raises(ValueError, match="ptx_coef"):
        total_loss(rl, ptx, -1.0)
    with pytest.raises(ValueError, match="ptx"):
        total_loss(rl, None, 0.5)


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
