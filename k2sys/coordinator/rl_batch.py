"""From scored rollouts to one trainer batch: the columns k2sys.rl.losses.K2PTXLoss trains on.

Rows: RL samples (prompt + response; a multi-turn response trains only on its policy tokens,
`Sample.response_mask`), then PTX rows (curated SFT data), then critic rows (the policy critic's
verdict-labelled refresh prompts, k2sys.tasks.open_ended). Columns follow the
trainer's batch format (k2sys.trainer.backend) plus loss inputs:
  rl_coef   [B]     1 / (K_g * G) for RL rows (K_g samples in the row's group, G groups), 0 for the others
  advantage [B]     r_i - mean_j r_j within the group
  old_lp    [B]     log pi_old(y_i|x) summed over the row's loss tokens
  is_weight [B]     importance weight for stale tokens (1 unless StalePolicyConfig.mode="importance")
  ptx_w     [B, T]  lambda / (PTX loss tokens) on PTX loss tokens, mu / (critic loss tokens) on critic
                    loss tokens, 0 elsewhere (each cross-entropy is a mean over its own rows' tokens)
  row_share [B]     1 / B, so the summed denominator over any split of the rows is exactly 1
so that  sum(loss_sum) / sum(denom) = L_K2 + lambda * L_PTX + mu * L_critic  for any micro-batch / DP split:
  L_K2 = (1/G) sum_g (1/K_g) sum_i (adv_i - tau * (lp_i - old_i))^2   (k2sys.rl.losses.K2PTXLoss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from k2sys.rl.losses import StalePolicyConfig, correct_stale_tokens


@dataclass
class Sample:
    """One finished response of a K2 group."""
    group_id: int
    family: str
    prompt_tokens: list[int]
    response_tokens: list[int]
    logprobs: list[float]
    """Engine sampling log-probs, one per response token."""
    versions: list[int]
    """Policy version that produced each response token."""
    reward: float = 0.0
    truncated: bool = False
    meta: dict = field(default_factory=dict)
    response_mask: list[int] | None = None
    """1 on tokens the policy generated, 0 on environment turns spliced into a multi-turn response
    (tool results, user turns); None = every response token is the policy's."""


def _pad_rows(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    T = max(len(s) for s in seqs)
    out = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def build_rl_batch(samples: list[Sample], pad_id: int, policy_version: int, stale: StalePolicyConfig,
                   ptx_rows: list[tuple[list[int], list[int]]] | None = None, ptx_coef: float = 0.0,
                   critic_rows: list[tuple[list[int], list[int]]] | None = None, critic_coef: float = 0.0,
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """samples -> batch (see module doc). ptx_rows, critic_rows: (input_ids, loss_mask) pairs from
    tokenize_chat; ptx_coef (lambda) and critic_coef (mu) weigh their cross-entropies."""
    if not samples:
        raise ValueError("build_rl_batch: no samples")
    ptx_rows, critic_rows = ptx_rows or [], critic_rows or []
    for what, coef in (("ptx_coef", ptx_coef), ("critic_coef", critic_coef)):
        if not (math.isfinite(coef) and coef >= 0):
            raise ValueError(f"build_rl_batch: {what} must be finite and >= 0, got {coef}")
    if ptx_coef > 0 and not ptx_rows:
        raise ValueError("build_rl_batch: ptx_coef > 0 but no PTX rows were given")
    extra = ptx_rows + critic_rows
    seqs = [s.prompt_tokens + s.response_tokens for s in samples] + [ids for ids, _ in extra]
    tokens = _pad_rows(seqs, pad_id)
    B, T = tokens.shape
    n_rl = len(samples)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    mask = torch.zeros(B, T)
    versions = torch.zeros(B, T, dtype=torch.long)
    behaviour = torch.zeros(B, T)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_tokens), len(s.response_tokens)
        # position t predicts labels[t] = tokens[t+1]: response token j sits at p+j, predicted at p+j-1
        if s.response_mask is None:
            mask[i, p - 1: p - 1 + r] = 1.0
        else:
            if len(s.response_mask) != r:
                raise ValueError(f"build_rl_batch: sample {i} has {r} response tokens but a response_mask of "
                                 f"{len(s.response_mask)}")
            mask[i, p - 1: p - 1 + r] = torch.tensor(s.response_mask, dtype=torch.float32)
        versions[i, p - 1: p - 1 + r] = torch.tensor(s.versions, dtype=torch.long)
        behaviour[i, p - 1: p - 1 + r] = torch.tensor(s.logprobs, dtype=torch.float32)
    ptx_w = torch.zeros(B, T)
    for j, (ids, m) in enumerate(extra):
        row = n_rl + j
        m_t = torch.tensor(m[1:], dtype=torch.float32)  # mask over targets: target t+1 predicted at t
        mask[row, : len(m_t)] = m_t
        ptx_w[row, : len(m_t)] = m_t
    n_ptx = len(ptx_rows)
    for rows, coef in ((slice(n_rl, n_rl + n_ptx), ptx_coef), (slice(n_rl + n_ptx, B), critic_coef)):
        ptx_w[rows] *= coef / max(float(ptx_w[rows].sum()), 1.0)

    corr = correct_stale_tokens(stale, versions[:n_rl], policy_version, mask[:n_rl])
    mask[:n_rl] = corr.mask.to(mask.dtype)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(s.group_id, []).append(i)
    G = len(groups)
    rl_coef = torch.zeros(B)
    advantage = torch.zeros(B)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    for members in groups.values():
        idx = torch.tensor(members)
        advantage[idx] = rewards[idx] - rewards[idx].mean()
        rl_coef[idx] = 1.0 / (len(members) * G)
    is_weight = torch.ones(B)
    if corr.weights is not None:
        is_weight[:n_rl] = corr.weights
    batch = {
        "tokens": tokens, "labels": labels, "loss_mask": mask,
        "position_ids": torch.arange(T).expand(B, T).contiguous(),
        "rl_coef": rl_coef, "advantage": advantage, "is_weight": is_weight, "ptx_w": ptx_w,
        "row_share": torch.full((B,), 1.0 / B),
        "behaviour_lp": behaviour, "old_lp": (behaviour * mask).sum(-1),
    }
    stats = {"groups": G, "samples": n_rl, "ptx_rows": n_ptx, "critic_rows": len(critic_rows),
             "stale_tokens": corr.num_stale_tokens,
             "masked_stale_tokens": corr.num_masked_tokens, "reward_mean": float(rewards.mean()),
             "response_tokens": int(mask[:n_rl].sum())}
    return batch, stats


def set_old_logprobs(batch: dict[str, torch.Tensor], token_logprobs: torch.Tensor) -> None:
    """Use a trainer recompute [B, T] of log pi_old instead of the engine's sampling log-probs."""
    batch["old_lp"] = (token_logprobs * batch["loss_mask"]).sum(-1)
