"""Rewards of Kimi K2 RL: the verifiable-rewards gym (tasks, code sandbox, instruction
following with a hack-check) and the self-critique rubric reward."""

from k2sys.rewards.code_reward import CodeResult, CodeVerifier, extract_code
from k2sys.rewards.critic import (CriticScore, EngineJudge, HeuristicJudge, PreferencePair, Rubric,
                                  RubricCritic, RubricItem, ScoredResponse, build_preference_pairs,
                                  default_rubric, pairwise_ranking_loss)
from k2sys.rewards.gym import RewardGym, Verifier, default_gym
from k2sys.rewards.instruction import (CONSTRAINT_KINDS, InstructionResult, InstructionVerifier,
                                       find_compliance_claims)
from k2sys.rewards.registry import (BUILTINS, FAILURE_REASONS, HTTPReward, PythonReward, Reward, RewardFailure,
                                    RewardItem, RewardResult, make_reward)
from k2sys.rewards.sandbox import SandboxConfig, SandboxResult, SandboxUnavailable, bwrap_available, run_python

__all__ = [
    "CodeResult", "CodeVerifier", "extract_code",
    "CriticScore", "EngineJudge", "HeuristicJudge", "PreferencePair", "Rubric", "RubricCritic",
    "RubricItem", "ScoredResponse", "build_preference_pairs", "default_rubric", "pairwise_ranking_loss",
    "RewardGym", "Verifier", "default_gym",
    "CONSTRAINT_KINDS", "InstructionResult", "InstructionVerifier", "find_compliance_claims",
    "SandboxConfig", "SandboxResult", "SandboxUnavailable", "bwrap_available", "run_python",
    "BUILTINS", "FAILURE_REASONS", "HTTPReward", "PythonReward", "Reward", "RewardFailure", "RewardItem",
    "RewardResult", "make_reward",
]
