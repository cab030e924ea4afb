"""RL losses of Kimi K1.5/K2 (seed section 4.3): the K2 policy loss, the PTX loss, and
the correction of tokens that partial rollouts carried over from older policy versions.

The K2 loss comes from the KL-regularised objective: the optimal policy satisfies
``r - tau log Z = tau log(pi*/pi_old)``; replacing ``tau log Z`` by the empirical mean reward
of the K samples of a prompt gives, per prompt x with samples y_1..y_K,

    L_x = (1/K) sum_i ( r_i - mean_j r_j - tau * (log pi_theta(y_i|x) - log pi_old(y_i|x)) )^2

and the loss is the mean of L_x over prompts. Log-probabilities are summed over the
response tokens, so this module also turns per-token log-probs into per-response sums.

Shapes: N responses, T response tokens (padded), V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "k2_policy_loss",
    "sequence_logprobs",
    "ptx_loss",
    "total_loss",
    "StalePolicyConfig",
    "StaleCorrection",
    "correct_stale_tokens",
    "logprob_mismatch",
]


def _check_1d(name: str, t: torch.Tensor, n: int | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N] (one value per response), got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} entries but logprobs has {n}; pass one value per response")


def k2_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    tau: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """K1.5/K2 policy loss (a scalar), exactly the formula in the module docstring.

    logprobs:     [N] log pi_theta(y_i|x) summed over response tokens (carries the gradient)
    old_logprobs: [N] log pi_old(y_i|x), same sums under the rollout policy (no gradient used)
    rewards:      [N] scalar rewards
    group_ids:    [N] integer id of the prompt each response answers; groups may differ in size
    tau:          > 0, the KL-regularisation strength
    weights:      optional [N] non-negative per-response weights (importance correction of
                  stale partial-rollout prefixes); each squared residual is multiplied by its
                  weight before the 1/K_g average. None equals all ones (the exact formula).
    """
    _check_1d("logprobs", logprobs, None)
    n = logprobs.shape[0]
    if n == 0:
        raise ValueError("logprobs is empty; the K2 loss needs at least one response")
    _check_1d("old_logprobs", old_logprobs, n)
    _check_1d("rewards", rewards, n)
    _check_1d("group_ids", group_ids, n)
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"tau must be a positive number (the KL strength), got {tau!r}")
    if weights is not None:
        _check_1d("weights", weights, n)
        if bool((weights < 0).any()):
            raise ValueError("weights must be non-negative")

    dtype = logprobs.dtype
    rewards = rewards.to(dtype)
    old_logprobs = old_logprobs.to(dtype).detach()
    # Dense group index 0..G-1 so scatter works for any id values (sparse, negative).
    _, gidx = torch.unique(group_ids, return_inverse=True)
    num_groups = int(gidx.max().item()) + 1
    counts = torch.zeros(num_groups, dtype=dtype, device=logprobs.device).index_add_(
        0, gidx, torch.ones_like(rewards))
    reward_sum = torch.zeros_like(counts).index_add_(0, gidx, rewards)
    baseline = (reward_sum / counts)[gidx]
    residual = rewards - baseline - tau * (logprobs - old_logprobs)
    sq = residual.pow(2)
    if weights is not None:
        sq = sq * weights.to(dtype).detach()
    per_group = torch.zeros_like(counts).index_add_(0, gidx, sq) / counts
    return per_group.mean()


def sequence_logprobs(token_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum per-token log-probs [N, T] over the response tokens where mask [N, T] is set -> [N]."""
    if token_logprobs.dim() != 2:
        raise ValueError(f"token_logprobs must be [N, T], got shape {tuple(token_logprobs.shape)}")
    if mask.shape != token_logprobs.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal token_logprobs shape "
                         f"{tuple(token_logprobs.shape)}")
    # where() instead of a product: padded positions may hold -inf/NaN log-probs.
    zero = torch.zeros((), dtype=token_logprobs.dtype, device=token_logprobs.device)
    return torch.where(mask.bool(), token_logprobs, zero).sum(dim=1)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on curated SFT data, mean over masked tokens.

    logits [B, T, V] and labels [B, T] are already aligned: logits[:, t] predicts labels[:, t]
    (the caller shifts by one, as it does for SFT). mask [B, T] selects the tokens that count
    (the answer tokens of an SFT sample).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must be logits.shape[:2] = "
                         f"{tuple(logits.shape[:2])}")
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal labels shape {tuple(labels.shape)}")
    m = mask.bool()
    count = int(m.sum().item())
    if count == 0:
        raise ValueError("mask selects no tokens; the PTX batch needs at least one target token")
    x = logits[m]
    if x.dtype in (torch.float16, torch.bfloat16):  # softmax over the vocabulary in fp32
        x = x.float()
    return F.cross_entropy(x, labels[m].long(), reduction="mean")


def total_loss(rl_loss: torch.Tensor, ptx: torch.Tensor | None, ptx_coef: float) -> torch.Tensor:
    """total = RL loss + lambda * PTX loss (seed 4.3); ptx None means no PTX batch this step."""
    if not ptx_coef >= 0:
        raise ValueError(f"ptx_coef (lambda) must be >= 0, got {ptx_coef!r}")
    if ptx is None:
        if ptx_coef > 0:
            raise ValueError("ptx is None but ptx_coef > 0; pass the PTX loss or set ptx_coef=0")
        return rl_loss
    return rl_loss + ptx_coef * ptx


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
