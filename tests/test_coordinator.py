"""Ownership state machine and the RL batch/loss the coordinator feeds the trainer."""

import random

import pytest
import torch
from test_rl_losses import reference_k2

from k2sys.coordinator import state as sm
from k2sys.coordinator.rl_batch import Sample, build_rl_batch
from k2sys.rl.losses import K2PTXLoss
from k2sys.rl import StalePolicyConfig


def test_full_iteration_walks_every_phase_and_measures():
    clock = iter(range(100))
    m = sm.OwnershipMachine(memory_probe=lambda: (1, 2), clock=lambda: float(next(clock)))
    order = ("continue", *sm.ROLLOUT_TO_TRAIN, "train", *sm.TRAIN_TO_ROLLOUT[:-1])
    owners = []
    for a in order:
        m.do(a, lambda: sm.StepResult(bytes_moved=10))
        owners.append(m.owner)
    assert m.phase == sm.Phase.READY
    assert owners[order.index("release_engine")] == sm.Owner.NOBODY
    assert owners[order.index("train")] == sm.Owner.TRAINER
    recs = m.drain_records()
    assert [r["action"] for r in recs] == list(order)
    assert all(r["seconds"] == 1.0 and r["bytes_moved"] == 10 and r["trainer_device_bytes"] == 2 for r in recs)
    s = sm.summarize(recs)
    assert s["rollout_to_train_s"] == 2.0 and s["train_to_rollout_s"] == 4.0 and s["bytes_moved"] == 10 * len(order)


@pytest.mark.parametrize("start,action", [
    (sm.Phase.READY, "train"), (sm.Phase.ROLLOUT, "onload_trainer"), (sm.Phase.RELEASED, "update_weights"),
    (sm.Phase.TRAINED, "resume_weights"), (sm.Phase.OFFLOADED, "resume_kv"), (sm.Phase.WEIGHTS_RESUMED, "continue"),
])
def test_illegal_transitions_raise_before_running(start, action):
    m = sm.OwnershipMachine(start)
    ran = []
    with pytest.raises(sm.IllegalTransition, match=action):
        m.do(action, lambda: ran.append(1))
    assert not ran and m.phase == start


def test_only_one_owner_at_a_time():
    for phase, owner in sm.OWNER.items():
        assert owner in (sm.Owner.ENGINE, sm.Owner.TRAINER, sm.Owner.NOBODY)
    # between the two owners there is always a NOBODY phase
    path = [sm.Phase.READY]
    for (p, a), q in sm.TRANSITIONS.items():
        if sm.OWNER[p] != sm.OWNER[q]:
            assert sm.Owner.NOBODY in (sm.OWNER[p], sm.OWNER[q])


def _samples(rng, groups=(3, 5, 2)):
    out = []
    for g, k in enumerate(groups):
        p = [rng.randrange(1, 50) for _ in range(rng.randrange(2, 6))]
        for _ in range(k):
            n = rng.randrange(1, 5)
            out.append(Sample(group_id=10 + g, family="f", prompt_tokens=p,
                              response_tokens=[rng.randrange(1, 50) for _ in range(n)],
                              logprobs=[-rng.random() for _ in range(n)], versions=[3] * n,
                              reward=float(rng.random() < 0.5)))
    return out


def test_loss_fn_equals_k2_formula_plus_ptx_under_any_split():
    rng = random.Random(0)
    samples = _samples(rng)
    ptx = [([rng.randrange(1, 50) for _ in range(7)], [0, 0, 0, 1, 1, 1, 1]),
           ([rng.randrange(1, 50) for _ in range(5)], [0, 0, 1, 1, 1])]
    batch, stats = build_rl_batch(samples, 0, 3, StalePolicyConfig(mode="none"), ptx, ptx_coef=0.3)
    B, T = batch["tokens"].shape
    lp = -torch.rand(B, T, dtype=torch.float64)
    tau = 0.2
    fn = K2PTXLoss(tau)
    b64 = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    # independent reference: per-response sums, the formula loop by loop (reference_k2), ptx mean CE
    n = len(samples)
    seq = torch.stack([(lp[i] * batch["loss_mask"][i]).sum() for i in range(n)])
    old = torch.stack([torch.tensor(sum(s.logprobs), dtype=torch.float64) for s in samples])
    ref_rl = torch.tensor(reference_k2(seq.tolist(), old.tolist(), [s.reward for s in samples],
                                       [s.group_id for s in samples], tau), dtype=torch.float64)
    ptx_mask = batch["loss_mask"][n:].double()
    ref_ptx = -(lp[n:] * ptx_mask).sum() / ptx_mask.sum()
    want = ref_rl + 0.3 * ref_ptx
    total, denom = fn(lp, b64)
    assert torch.allclose(total / denom, want, atol=1e-10)
    # the same over micro-batches (rows split arbitrarily): sum of sums / sum of denoms
    parts = [slice(0, 4), slice(4, 9), slice(9, B)]
    s_sum = sum(fn(lp[p], {k: v[p] for k, v in b64.items()})[0] for p in parts)
    d_sum = sum(fn(lp[p], {k: v[p] for k, v in b64.items()})[1] for p in parts)
    assert torch.allclose(s_sum / d_sum, want, atol=1e-10)
    assert stats["groups"] == 3 and stats["samples"] == 10


def test_loss_mask_targets_exactly_the_response_tokens():
    s = Sample(group_id=0, family="f", prompt_tokens=[5, 6, 7], response_tokens=[8, 9], logprobs=[-1.0, -2.0],
               versions=[0, 0], reward=1.0)
    t = Sample(group_id=0, family="f", prompt_tokens=[5, 6, 7], response_tokens=[4], logprobs=[-0.5], versions=[0])
    batch, _ = build_rl_batch([s, t], 0, 0, StalePolicyConfig(mode="none"))
    m = batch["loss_mask"]
    labels = batch["labels"]
    assert labels[0][m[0].bool()].tolist() == [8, 9]
    assert labels[1][m[1].bool()].tolist() == [4]
    assert batch["old_lp"].tolist() == [-3.0, -0.5]
    assert batch["advantage"].tolist() == [0.5, -0.5]


def test_stale_tokens_are_masked():
    s = Sample(group_id=0, family="f", prompt_tokens=[1, 2], response_tokens=[3, 4, 5], logprobs=[-1.0] * 3,
               versions=[1, 1, 4], reward=1.0)
    t = Sample(group_id=0, family="f", prompt_tokens=[1, 2], response_tokens=[6], logprobs=[-1.0], versions=[4])
    batch, stats = build_rl_batch([s, t], 0, 4, StalePolicyConfig(mode="mask", max_staleness=1))
    assert batch["loss_mask"][0].sum() == 1 and stats["masked_stale_tokens"] == 2
