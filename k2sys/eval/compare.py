"""Compare checkpoints: results files -> per-family figures with 95% intervals and deltas vs a baseline.

    results (first = baseline) -> per family and metric, per-task values (mean reward; pass@k estimate)
    -> each model's figure with an interval: Wilson score when every per-task value is 0/1 (greedy pass@1),
       percentile bootstrap over tasks otherwise
    -> delta vs baseline with an interval: paired bootstrap over the tasks both runs scored (the same
       benchmark file), else unpaired (Newcombe's hybrid score interval for 0/1 values, bootstrap otherwise)
    -> report.md (a table; '*' marks a delta whose interval excludes 0) and report.png (matplotlib, when
       installed; the markdown says so when it is not)

Adapter figures without per-task values (e.g. IFEval's instruction-level accuracy) are listed with their
delta and no interval.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from k2sys.eval.passk import per_task_values

__all__ = ["wilson_interval", "newcombe_interval", "bootstrap_ci", "paired_bootstrap_delta", "compare_results",
           "render_markdown", "plot_comparison", "write_report"]

Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion successes / n."""
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes {successes} outside [0, {n}]")
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    # at p = 0 (1) the bound is exactly 0 (1); the formula leaves rounding residue there
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def newcombe_interval(s1: float, n1: int, s2: float, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval of p2 - p1 for independent proportions (Newcombe 1998, method 10, from Wilson intervals)."""
    p1, p2 = s1 / n1, s2 / n2
    l1, u1 = wilson_interval(s1, n1, z)
    l2, u2 = wilson_interval(s2, n2, z)
    d = p2 - p1
    return d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)


def bootstrap_ci(values: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (tasks resampled with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("bootstrap_ci: no values")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(resamples, v.size))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_bootstrap_delta(base: dict[str, float], other: dict[str, float], *, resamples: int = 2000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float, float, int]:
    """(mean delta, lo, hi, shared tasks) of other - base over the tasks both scored."""
    shared = sorted(set(base) & set(other))
    if not shared:
        raise ValueError("paired_bootstrap_delta: the two runs share no task ids")
    d = np.array([other[t] - base[t] for t in shared])
    lo, hi = bootstrap_ci(d, resamples=resamples, seed=seed, level=level)
    return float(d.mean()), lo, hi, len(shared)


def _binary(values: Sequence[float]) -> bool:
    return all(v in (0.0, 1.0) for v in values)


def _value_ci(values: list[float], resamples: int, seed: int) -> tuple[float, float, str]:
    if _binary(values):
        return (*wilson_interval(sum(values), len(values)), "wilson")
    return (*bootstrap_ci(values, resamples=resamples, seed=seed), "bootstrap")


def _tables(res: dict) -> dict[str, dict[str, list[float]]]:
    return {f: r["tasks"] for f, r in res["families"].items()}


def _metrics_of(res: dict) -> list[str]:
    n = res["sampling"]["n"]
    return [f"avg@{n}"] + [f"pass@{k}" for k in sorted(res["sampling"]["ks"])]


def compare_results(results: Sequence[dict], names: Sequence[str] | None = None, *, resamples: int = 2000,
                    seed: int = 0) -> dict:
    """The comparison of results dicts (see the module doc); results[0] is the baseline."""
    if len(results) < 2:
        raise ValueError("compare: give at least two results files (the first is the baseline)")
    names = list(names or [r.get("model") or f"run{i}" for i, r in enumerate(results)])
    if len(set(names)) != len(names):
        names = [f"{n} ({i})" for i, n in enumerate(names)]
    base = results[0]
    metrics = [m for m in _metrics_of(base) if all(m in _metrics_of(r) for r in results[1:])]
    families = [f for f in base["families"] if all(f in r["families"] for r in results[1:])]
    notes = []
    for r, name in zip(results[1:], names[1:]):
        extra = sorted(set(r["families"]) - set(base["families"]))
        if extra:
            notes.append(f"{name}: families not in the baseline, left out: {extra}")
    if not metrics:
        notes.append("the runs share no avg@n / pass@k metric (different --n or --k); only adapter figures compared")
    rows = []
    for fam in families + ["overall"]:
        for metric in metrics:
            per_run = []
            for r in results:
                tabs = _tables(r) if fam == "overall" else {fam: r["families"][fam]["tasks"]}
                th = r["sampling"].get("threshold", 1.0)
                vals = {f"{f}/{t}": v for f, tab in tabs.items()
                        for t, v in per_task_values(tab, metric, th).items() if f in families}
                per_run.append(vals)
            row = {"family": fam, "metric": metric, "values": {}, "deltas": {}}
            for name, vals in zip(names, per_run):
                xs = list(vals.values())
                lo, hi, how = _value_ci(xs, resamples, seed)
                row["values"][name] = {"value": sum(xs) / len(xs), "lo": lo, "hi": hi, "n": len(xs), "ci": how}
            for name, vals in zip(names[1:], per_run[1:]):
                b = per_run[0]
                if set(b) & set(vals):
                    d, lo, hi, n = paired_bootstrap_delta(b, vals, resamples=resamples, seed=seed)
                    how = "paired bootstrap"
                elif _binary(b.values()) and _binary(vals.values()):
                    d = sum(vals.values()) / len(vals) - sum(b.values()) / len(b)
                    lo, hi = newcombe_interval(sum(b.values()), len(b), sum(vals.values()), len(vals))
                    n, how = 0, "newcombe"
                else:
                    bb = np.random.default_rng(seed)
                    xb, xo = np.array(list(b.values())), np.array(list(vals.values()))
                    ds = (xo[bb.integers(0, xo.size, (resamples, xo.size))].mean(1)
                          - xb[bb.integers(0, xb.size, (resamples, xb.size))].mean(1))
                    d, lo, hi = float(xo.mean() - xb.mean()), float(np.quantile(ds, .025)), float(np.quantile(ds, .975))
                    n, how = 0, "unpaired bootstrap"
                row["deltas"][name] = {"delta": d, "lo": lo, "hi": hi, "shared": n, "ci": how,
                                       "significant": lo > 0 or hi < 0}
            rows.append(row)
    extras = []
    for fam in families:
        keys = [k for k in base["families"][fam]["metrics"] if k not in metrics and not k.startswith(("avg@", "pass@"))]
        for k in keys:
            vals = {n: r["families"][fam]["metrics"].get(k) for n, r in zip(names, results)}
            if all(v is not None for v in vals.values()):
                extras.append({"family": fam, "metric": k, "values": vals})
    # Each family has its own response cap (the recipes give long-answer families more room than the
    # global max_tokens): report the caps used, and say so when runs differ (not like for like).
    caps = {n: {f: r["families"][f].get("max_tokens", r["sampling"].get("max_tokens")) for f in families}
            for n, r in zip(names, results)}
    for fam in families:
        used = {n: caps[n][fam] for n in names}
        if len(set(used.values())) > 1:
            notes.append(f"{fam}: runs used different max_tokens {used}; the comparison is not like for like")
    return {"baseline": names[0], "models": names, "metrics": metrics, "rows": rows, "extras": extras,
            "notes": notes, "resamples": resamples, "max_tokens": caps,
            "sampling": {n: r["sampling"] for n, r in zip(names, results)}}


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def render_markdown(cmp: dict, *, png: str | None = None, png_note: str | None = None) -> str:
    names, base = cmp["models"], cmp["baseline"]
    out = ["# Evaluation comparison", "",
           f"Baseline: **{base}**. Figures are means over tasks with 95% intervals: Wilson score for 0/1 "
           f"per-task values, percentile bootstrap ({cmp['resamples']} resamples) otherwise. Deltas are "
           "paired bootstrap intervals over the tasks both runs scored; `*` marks a delta whose interval "
           "excludes 0.", ""]
    for n in names:
        s = cmp["sampling"][n]
        caps = cmp.get("max_tokens", {}).get(n, {})
        if caps and len(set(caps.values())) == 1:
            cap = f"max_tokens={next(iter(caps.values()))}"
        elif caps:
            cap = "max_tokens per family: " + ", ".join(f"{f}={c}" for f, c in caps.items())
        else:
            cap = f"max_tokens={s['max_tokens']}"
        out.append(f"- {n}: n={s['n']}, temperature={s['temperature']}, top_p={s['top_p']}, {cap}, seed={s['seed']}")
    out.append("")
    head = ["family", "metric"] + names + [f"Δ {n} − {base}" for n in names[1:]]
    out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in cmp["rows"]:
        cells = [r["family"], r["metric"]]
        cells += [f"{_fmt(v['value'])} [{_fmt(v['lo'])}, {_fmt(v['hi'])}]" for v in r["values"].values()]
        cells += [f"{d['delta']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]{' *' if d['significant'] else ''}"
                  for d in r["deltas"].values()]
        out.append("| " + " | ".join(cells) + " |")
    if cmp["extras"]:
        out += ["", "Adapter figures (no per-task values, so no interval):", "",
                "| family | metric | " + " | ".join(names) + " | " + " | ".join(f"Δ {n}" for n in names[1:]) + " |",
                "|" + "---|" * (2 + 2 * len(names) - 1)]
        for e in cmp["extras"]:
            v = list(e["values"].values())
            out.append(f"| {e['family']} | {e['metric']} | " + " | ".join(_fmt(x) for x in v) + " | "
                       + " | ".join(f"{x - v[0]:+.3f}" for x in v[1:]) + " |")
    for note in cmp["notes"]:
        out += ["", f"Note: {note}"]
    out += ["", f"![comparison]({png})" if png else f"Note: no plot: {png_note or 'not requested'}.", ""]
    return "\n".join(out)


def plot_comparison(cmp: dict, path: str | Path) -> str | None:
    """A bar chart per metric (families x models, 95% error bars); None (and no file) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = cmp["metrics"]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    width = 0.8 / len(cmp["models"])
    for ax, metric in zip(axes[0], metrics):
        rows = [r for r in cmp["rows"] if r["metric"] == metric]
        for i, name in enumerate(cmp["models"]):
            vals = [r["values"][name] for r in rows]
            ys = [v["value"] for v in vals]
            err = [[max(0.0, y - v["lo"]) for y, v in zip(ys, vals)], [max(0.0, v["hi"] - y) for y, v in zip(ys, vals)]]
            ax.bar([j + i * width for j in range(len(rows))], ys, width, yerr=err, capsize=3, label=name)
        ax.set_xticks([j + width * (len(cmp["models"]) - 1) / 2 for j in range(len(rows))],
                      [r["family"] for r in rows], rotation=30)
        ax.set(title=metric, ylim=(0, 1))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def write_report(results: Sequence[dict], out_md: str | Path, *, names: Sequence[str] | None = None,
                 png: str | Path | None = "auto", resamples: int = 2000, seed: int = 0) -> dict:
    """compare_results -> out_md (+ a PNG next to it unless png=None); returns the comparison."""
    import os

    cmp = compare_results(results, names, resamples=resamples, seed=seed)
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    png_path, note = None, None
    if png is not None:
        target = out_md.with_suffix(".png") if png == "auto" else Path(png)
        png_path = plot_comparison(cmp, target)
        note = None if png_path else "matplotlib is not installed (pip install matplotlib for report.png)"
    rel = os.path.relpath(png_path, out_md.parent) if png_path else None
    tmp = out_md.with_name(f".{out_md.name}.tmp")
    tmp.write_text(render_markdown(cmp, png=rel, png_note=note))
    os.replace(tmp, out_md)
    cmp["png"] = png_path
    return cmp
