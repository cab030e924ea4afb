"""RL algorithm core of Kimi K2 (seed section 4.3): K2 policy loss + PTX loss, budget control,
temperature decay, difficulty filter, and the partial-rollout buffer."""

from k2sys.rl.budget import BudgetConfig, BudgetController, TruncationResult
from k2sys.rl.filters import DifficultyFilter, FilterResult, pass_at_k
from k2sys.rl.losses import K2PTXLoss, StaleCorrection, StalePolicyConfig, correct_stale_tokens, logprob_mismatch
from k2sys.rl.rollout_buffer import PartialTrajectory, ResumeStats, RolloutBuffer
from k2sys.rl.schedule import TemperatureSchedule

__all__ = [
    "BudgetConfig", "BudgetController", "TruncationResult",
    "DifficultyFilter", "FilterResult", "pass_at_k",
    "K2PTXLoss", "StaleCorrection", "StalePolicyConfig", "correct_stale_tokens", "logprob_mismatch",
    "PartialTrajectory", "ResumeStats", "RolloutBuffer",
    "TemperatureSchedule",
]
