"""Evaluation: avg@k and unbiased pass@k of public benchmarks and of the recipe's held-out tasks, multi-turn
episodes, and checkpoint comparison reports.

    run_suite / run_families   public benchmark files (gsm8k, math, ifeval, humaneval, mbpp, tau) through a
                               chat Generator (OpenAI-compatible endpoint or an engine); `k2sys eval`
    evaluate_heldout           the recipe's held-out task families and envs through the same harness
                               (k2sys.eval.harness; RecipeRunner.run_eval), recipe_summary for its report
    write_report               compare results files: per-family deltas with confidence intervals
"""

from k2sys.eval.harness import EvalConfig, evaluate_heldout, recipe_summary
from k2sys.eval.passk import avg_at_k, family_metrics, overall_metrics, pass_at_k

__all__ = ["EvalConfig", "evaluate_heldout", "recipe_summary", "pass_at_k", "avg_at_k", "family_metrics",
           "overall_metrics", "run_suite", "run_families", "FamilyRun", "SuiteEntry", "SamplingConfig",
           "write_report", "compare_results", "ADAPTERS", "get_adapter", "OpenAIChatGenerator",
           "EngineChatGenerator", "ChatRequest", "Completion"]

_LAZY = {"run_suite": "suite", "run_families": "suite", "FamilyRun": "suite", "SuiteEntry": "suite",
         "SamplingConfig": "suite", "write_report": "compare", "compare_results": "compare", "ADAPTERS": "adapters",
         "get_adapter": "adapters", "OpenAIChatGenerator": "generators", "EngineChatGenerator": "generators",
         "ChatRequest": "generators", "Completion": "generators"}


def __getattr__(name: str):
    # the comparison report (numpy, matplotlib) and the HTTP generator load only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"k2sys.eval.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'k2sys.eval' has no attribute {name!r}")
