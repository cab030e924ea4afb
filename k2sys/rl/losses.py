"""RL losses of Kimi K1.5/K2 (seed section 4.3): the K2 policy loss + PTX loss the trainer runs,
and the correction of tokens that partial rollouts carried over from older policy versions.

The K2 loss comes from the KL-regularised objective: the optimal policy satisfies
``r - tau log Z = tau log(pi*/pi_old)``; replacing ``tau log Z`` by the empirical mean reward
of the K samples of a prompt gives, per prompt x with samples y_1..y_K,

    L_x = (1/K) sum_i ( r_i - mean_j r_j - tau * (log pi_theta(y_i|x) - log pi_old(y_i|x)) )^2

and the loss is the mean of L_x over prompts; log-probabilities are summed over the response
tokens. PTX adds lambda x the cross-entropy of curated SFT rows (and mu x that of the critic's
refresh rows). `K2PTXLoss` computes all of it from the columns k2sys.coordinator.rl_batch puts in
the trainer batch, as a (loss_sum, denom) pair that sums exactly over any micro-batch split; the
formula itself, written out loop by loop, is the reference in tests/test_rl_losses.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = [
    "K2PTXLoss",
    "StalePolicyConfig",
    "StaleCorrection",
    "correct_stale_tokens",
    "logprob_mismatch",
]


class K2PTXLoss:
    """loss_fn(token log-probs [b, T], local batch) -> (loss_sum, denom) for MegatronBackend.train_step.

    Batch columns (k2sys.coordinator.rl_batch): rl_coef = 1/(G K_g) on RL rows, advantage = r_i - mean_g r,
    old_lp = log pi_old summed over the row's loss tokens, is_weight (stale-token importance weights),
    ptx_w = lambda (or mu) / (loss tokens of its rows) on PTX (critic) loss tokens, row_share = 1/B.
    sum(loss_sum) / sum(denom) over any split of the rows is L_K2 + lambda L_PTX + mu L_critic.
    A class (not a closure) so the coordinator can send it to the other trainer ranks."""

    def __init__(self, tau: float):
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0 (the KL strength), got {tau!r}")
        self.tau = float(tau)

    def __call__(self, lp: torch.Tensor, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
        rl_rows = (b["rl_coef"] > 0).to(lp.dtype)
        seq = (lp * b["loss_mask"] * rl_rows[:, None]).sum(-1)
        resid = b["advantage"] - self.tau * (seq - b["old_lp"])
        rl = (b["rl_coef"] * b["is_weight"] * resid.pow(2)).sum()
        ptx = -(b["ptx_w"] * lp).sum()
        return rl + ptx, b["row_share"].sum()


@dataclass(kw_only=True)
class StalePolicyConfig:
    """How tokens sampled by older policy versions (partial rollouts) enter the K2 loss.

    ``staleness = policy_version - token_version`` where ``policy_version`` is the version of
    pi_old (the weights the engine held when this iteration's rollout ended).
    """

    mode: Literal["none", "mask", "importance"] = "mask"
    """none: use every token as if on-policy. mask: drop tokens with staleness > max_staleness
    from both log-prob sums. importance: keep all tokens, weight each response's squared
    residual by the truncated sequence ratio pi_old/behaviour over its stale tokens."""
    max_staleness: int = 1
    """mask mode: tokens at most this many versions behind are kept (1 = current and previous)."""
    is_clip: float = 2.0
    """importance mode: upper bound of the per-response importance weight (truncated IS)."""

    def __post_init__(self) -> None:
        if self.mode not in ("none", "mask", "importance"):
            raise ValueError(f"StalePolicyConfig.mode must be 'none', 'mask' or 'importance', got {self.mode!r}")
        if not isinstance(self.max_staleness, int) or self.max_staleness < 0:
            raise ValueError(f"StalePolicyConfig.max_staleness must be an int >= 0, got {self.max_staleness!r}")
        if not self.is_clip > 0:
            raise ValueError(f"StalePolicyConfig.is_clip must be > 0, got {self.is_clip!r}")


@dataclass
class StaleCorrection:
    mask: torch.Tensor            # [N, T] token mask to use for the log-prob sums
    weights: torch.Tensor | None  # [N] per-response weights for k2_policy_loss, or None
    num_stale_tokens: int         # tokens older than policy_version
    num_masked_tokens: int        # tokens removed by mask mode


def correct_stale_tokens(
    config: StalePolicyConfig,
    token_versions: torch.Tensor,
    policy_version: int,
    mask: torch.Tensor,
    behaviour_logprobs: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> StaleCorrection:
    """Apply ``config`` to a batch of responses whose tokens came from several policy versions.

    token_versions [N, T]: version of the policy that sampled each token.
    behaviour_logprobs [N, T]: the engine's sampling log-probs (importance mode).
    old_logprobs [N, T]: pi_old recomputed by the trainer at ``policy_version`` (importance mode).
    """
    if token_versions.shape != mask.shape:
        raise ValueError(f"token_versions shape {tuple(token_versions.shape)} must equal mask shape "
                         f"{tuple(mask.shape)}")
    m = mask.bool()
    staleness = policy_version - token_versions.long()
    if bool((staleness[m] < 0).any()):
        raise ValueError(f"token_versions contain versions newer than policy_version={policy_version}")
    stale = m & (staleness > 0)
    n_stale = int(stale.sum().item())
    if config.mode == "none":
        return StaleCorrection(mask=m, weights=None, num_stale_tokens=n_stale, num_masked_tokens=0)
    if config.mode == "mask":
        keep = m & (staleness <= config.max_staleness)
        return StaleCorrection(mask=keep, weights=None, num_stale_tokens=n_stale,
                               num_masked_tokens=int((m & ~keep).sum().item()))
    if behaviour_logprobs is None or old_logprobs is None:
        raise ValueError("importance mode needs behaviour_logprobs (engine) and old_logprobs "
                         "(trainer recompute at policy_version), both [N, T]")
    for name, t in (("behaviour_logprobs", behaviour_logprobs), ("old_logprobs", old_logprobs)):
        if t.shape != mask.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} must equal mask shape {tuple(mask.shape)}")
    # Sequence-level ratio over the stale tokens only: fresh tokens were sampled by pi_old itself.
    zero = torch.zeros((), dtype=old_logprobs.dtype, device=old_logprobs.device)
    log_ratio = torch.where(stale, old_logprobs.detach() - behaviour_logprobs.detach(), zero).sum(1)
    # Clamp in log space so a long stale prefix cannot overflow exp().
    weights = torch.exp(torch.clamp(log_ratio, max=math.log(config.is_clip)))
    return StaleCorrection(mask=m, weights=weights, num_stale_tokens=n_stale, num_masked_tokens=0)


def logprob_mismatch(engine_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> dict[str, float]:
    """Per-token engine-vs-trainer log-prob difference on the same weights (logged every
    iteration: a wrong weight update or kernel shows up here before it silently breaks RL)."""
    if engine_logprobs.shape != trainer_logprobs.shape or mask.shape != engine_logprobs.shape:
        raise ValueError(f"engine_logprobs {tuple(engine_logprobs.shape)}, trainer_logprobs "
                         f"{tuple(trainer_logprobs.shape)} and mask {tuple(mask.shape)} must match")
    m = mask.bool()
    if not bool(m.any()):
        raise ValueError("mask selects no tokens")
    d = (engine_logprobs.detach().double() - trainer_logprobs.detach().double())[m]
    # k3 estimator of KL(engine || trainer) per token: non-negative, low variance.
    log_r = -d
    k3 = (torch.exp(log_r) - 1 - log_r).mean()
    return {
        "mean_abs": float(d.abs().mean()),
        "max_abs": float(d.abs().max()),
        "mean": float(d.mean()),
        "kl_k3": float(k3),
        "tokens": int(m.sum()),
    }
