"""Evaluation harness: avg@k and pass@k of task families through any InferenceEngine."""

from k2sys.eval.harness import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate"]
