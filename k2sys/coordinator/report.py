"""runs/<name>/report.json, report.md and plot.png from state.json and metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from k2sys.coordinator.metrics import read_metrics
from k2sys.models.hf_io import write_json_atomic


def _series(recs: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    last: dict[int, float] = {}
    for r in recs:
        if r["kind"] == kind and key in r:
            last[r["step"]] = r[key]  # a resumed run may repeat a step: keep the latest
    steps = sorted(last)
    return steps, [last[s] for s in steps]


def plot(run_dir: Path, recs: list[dict], families: list[str], evals: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for f in families:
        x, y = _series(recs, "rl", f"reward/{f}")
        ax[0].plot(x, y, label=f)
    x, y = _series(recs, "rl", "reward_mean")
    ax[0].plot(x, y, "k--", label="all")
    ax[0].set(title="RL rollout reward", xlabel="iteration")
    ax[0].legend()
    names = list(evals)
    width = 0.8 / max(len(names), 1)
    for i, tag in enumerate(names):
        ax[1].bar([j + i * width for j in range(len(families))],
                  [evals[tag].get(f, {}).get("accuracy", 0) for f in families], width, label=tag)
    ax[1].set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(families))], families)
    ax[1].set(title="held-out accuracy", ylim=(0, 1))
    ax[1].legend()
    for key, label in (("rollout_to_train_s", "rollout->train"), ("train_to_rollout_s", "train->rollout")):
        x, y = _series(recs, "rl", key)
        ax[2].plot(x, y, label=label)
    ax[2].set(title="switch latency (s)", xlabel="iteration")
    ax[2].legend()
    fig.tight_layout()
    out = run_dir / "plot.png"
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def run_time(state: dict) -> dict:
    """Time over every process that worked on the run (state["segments"], one per start; a segment cut by
    kill -9 ends at its last heartbeat): total_s is their sum, wall_s first start to last end."""
    segs = state.get("segments") or []
    if not segs:  # a run directory from before segments were recorded
        return {"total_s": state.get("total_s"), "segments": 1, "resumes": 0}
    secs = [max(sg["end"] - sg["start"], 0.0) for sg in segs]
    return {"total_s": sum(secs), "wall_s": max(sg["end"] for sg in segs) - min(sg["start"] for sg in segs),
            "segments": len(segs), "resumes": len(segs) - 1, "segment_s": [round(x, 3) for x in secs],
            "segment_outcomes": [sg.get("outcome", "?") for sg in segs],
            "interrupted": sum(1 for sg in segs if sg.get("outcome") in ("killed", "failed"))}


def write_report(run_dir: Path, cfg: Any, state: dict) -> dict:
    recs = read_metrics(run_dir)
    families = list(cfg.tasks.families) + (cfg.tasks.env_kinds() if hasattr(cfg.tasks, "env_kinds") else [])
    data = getattr(cfg, "data", None)
    if data is not None and data.rl_prompts:
        families.append("user")
    evals = state.get("eval", {})
    rl_recs = [r for r in recs if r["kind"] == "rl"]
    switch = {k: sum(r.get(k, 0.0) for r in rl_recs) / max(len(rl_recs), 1)
              for k in ("rollout_to_train_s", "train_to_rollout_s")}
    delta = {f: evals.get("rl", {}).get(f, {}).get("accuracy", 0.0) - evals.get("sft", {}).get(f, {}).get("accuracy", 0.0)
             for f in families}
    report = {
        "eval": {tag: {f: {"accuracy": r[f]["accuracy"], "n": r[f]["n"]} for f in families if f in r}
                 for tag, r in evals.items()},
        "delta_accuracy": delta,
        "learned": any(d >= 0.10 for d in delta.values()) and all(d >= 0.0 for d in delta.values()),
        "rl_iterations": state.get("rl_iter", 0),
        "sft_eval_loss": state.get("sft_eval_loss"),
        "mean_switch_s": switch,
        "resumed_samples": sum(r.get("resumed_samples", 0) for r in rl_recs),
        "paused_requests": sum(r.get("paused_requests", 0) for r in rl_recs),
        **run_time(state),
    }
    write_json_atomic(run_dir / "report.json", report)
    png = plot(run_dir, recs, families, evals)
    lines = [f"# k2sys run `{cfg.name}`", "",
             f"Model {getattr(cfg.model, 'path', None) or cfg.model.preset}; SFT {cfg.sft.steps} steps; RL {report['rl_iterations']} iterations "
             f"(K={cfg.rollout.samples_per_prompt}, tau={cfg.rl.tau}, PTX lambda={cfg.rl.ptx_coef}, "
             f"temperature {cfg.rl.t_start}->{cfg.rl.t_end}).", "",
             f"Held-out accuracy ({'greedy' if cfg.eval.temperature == 0 else f'avg@{cfg.eval.k} at T={cfg.eval.temperature}'}"
             f"; n = held-out tasks, at most {cfg.eval.n_tasks}):", "",
             "| family | n | after SFT | after RL | change |", "|---|---|---|---|---|"]
    for f in families:
        a = evals.get("sft", {}).get(f, {}).get("accuracy")
        b = evals.get("rl", {}).get(f, {}).get("accuracy")
        fmt = (lambda v: "-" if v is None else f"{100 * v:.1f}%")
        n = evals.get("rl", evals.get("sft", {})).get(f, {}).get("n", "-")
        lines.append(f"| {f} | {n} | {fmt(a)} | {fmt(b)} | {100 * delta[f]:+.1f} pts |")
    fails = [r for r in rl_recs if "reward_items" in r]
    if fails:
        last = fails[-1]
        why = ", ".join(f"{k.split('/', 1)[1]} {v}" for k, v in last.items() if k.startswith("reward_failed/") and v)
        lines += ["", f"User reward `{cfg.reward}`: {last['reward_items']} samples scored (evaluation and RL), "
                      f"{last['reward_failed']} failed and scored 0{f' ({why})' if why else ''}."]
    lines += ["", f"Learning criterion (>= +10 pts on one family, no family lower): "
                  f"**{'met' if report['learned'] else 'not met'}**.", "",
              f"Mean switch latency per iteration: rollout->train {switch['rollout_to_train_s']:.3f} s, "
              f"train->rollout {switch['train_to_rollout_s']:.3f} s.",
              f"Partial rollouts: {report['paused_requests']} requests paused, {report['resumed_samples']} "
              f"trained samples resumed across policy versions.", ""]
    if report.get("total_s") is not None:
        lines += [f"Run time {report['total_s']:.1f} s over {report['segments']} process(es)"
                  f" ({report.get('interrupted', 0)} interrupted and resumed).", ""]
    if png:
        lines.append("![reward, accuracy, switch times](plot.png)")
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")
    return report
