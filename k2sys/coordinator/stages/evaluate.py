"""Eval stage: held-out families and environment kinds through the eval harness."""

from __future__ import annotations

import logging

from k2sys.coordinator import state as sm
from k2sys.coordinator.stages import RecipeRunner
from k2sys.eval import evaluate_heldout, recipe_summary

log = logging.getLogger("k2sys.coordinator")


def evaluate(run: RecipeRunner, tag: str) -> dict:
    """Held-out families and env kinds through the eval harness (k2sys.eval.harness): results.json and
    samples.jsonl in <run>/eval/<tag>/ (`k2sys eval compare` reads them), the per-family summary in
    state.json and as eval/<tag>/<family>/<metric> records."""
    if tag in run.state.get("eval", {}):
        return run.state["eval"][tag]
    heldout = run.tasks("heldout")
    fams = {f: (run.families[f], heldout[f]) for f in run.families}
    envs = {kind: run.cfg.tasks.env_specs(kind, "heldout", run.cfg.seed) for kind in run.cfg.tasks.env_kinds()}
    results = run.engine_call(lambda: evaluate_heldout(
        run.engine.client, run.tok, fams, envs, run.cfg.eval, agent=run.cfg.agent, budgets=run.cfg.rl.budgets,
        out_dir=run.dir / "eval" / tag, model=f"{run.cfg.name}/{tag}", log=log.info))
    rep = recipe_summary(results)
    k = results["sampling"]["n"]
    shown = ["accuracy"] + ([f"avg@{k}", f"pass@{k}"] if k > 1 else []) + ["prompt_strict", "inst_strict"]
    for f, r in rep.items():  # logged before the commit: a resume drops the records of an uncommitted eval
        run.metrics.log("eval", run.state.get("rl_iter", 0),
                        **{f"{tag}/{f}/{m}": r[m] for m in shown if m in r})
    sm.fault_point("eval")  # TEST HOOK (K2SYS_FAULT): results and metrics written, eval not committed
    run.save_state(eval={**run.state.get("eval", {}), tag: rep})
    log.info("eval %s: %s", tag, {f: round(r["accuracy"], 3) for f, r in rep.items()})
    return rep
