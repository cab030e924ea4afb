"""Evaluation harness: avg@k and pass@k of task families, and greedy multi-turn episodes of
environments, through any InferenceEngine."""

from k2sys.eval.harness import EvalConfig, evaluate, evaluate_episodes

__all__ = ["EvalConfig", "evaluate", "evaluate_episodes"]
