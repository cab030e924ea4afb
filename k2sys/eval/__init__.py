"""Evaluation: avg@k and unbiased pass@k of task families and public benchmarks, multi-turn episodes,
and checkpoint comparison reports.

    evaluate / evaluate_episodes   held-out k2sys task families and envs through an InferenceEngine (the recipe)
    run_suite                      public benchmark files (gsm8k, math, ifeval, humaneval, mbpp, tau) through a
                                   chat Generator (OpenAI-compatible endpoint or an engine); `k2sys eval`
    write_report                   compare results files: per-family deltas with confidence intervals
"""

from k2sys.eval.harness import EvalConfig, evaluate, evaluate_episodes
from k2sys.eval.passk import avg_at_k, family_metrics, overall_metrics, pass_at_k

__all__ = ["EvalConfig", "evaluate", "evaluate_episodes", "pass_at_k", "avg_at_k", "family_metrics",
           "overall_metrics", "run_suite", "SuiteEntry", "SamplingConfig", "write_report", "compare_results",
           "ADAPTERS", "get_adapter", "OpenAIChatGenerator", "EngineChatGenerator", "ChatRequest", "Completion"]

_LAZY = {"run_suite": "suite", "SuiteEntry": "suite", "SamplingConfig": "suite", "write_report": "compare",
         "compare_results": "compare", "ADAPTERS": "adapters", "get_adapter": "adapters",
         "OpenAIChatGenerator": "generators", "EngineChatGenerator": "generators", "ChatRequest": "generators",
         "Completion": "generators"}


def __getattr__(name: str):
    # the benchmark harness (sympy, numpy, the sandbox) loads only when used, not with the recipe's evaluate()
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"k2sys.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'k2sys.eval' has no attribute {name!r}")
