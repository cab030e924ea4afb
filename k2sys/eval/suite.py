"""Run a benchmark suite against a model: families of public benchmarks, n samples each, one results file.

    SuiteEntry(family, adapter, path) -> Adapter.load -> items -> FamilyRun     (run_suite; the recipe's
                                                                                 held-out tasks: eval.harness)
    -> run_families: n samples per item (ChatRequest, seed = seed + 7919 * item + sample; greedy: n = 1,
       temperature 0); text: Generator.chat -> Adapter.score_many (a cut response scores 0 where the adapter
       says so: cut_scores_zero); episodes: generator.play_episodes when it has one, else run_chat_episodes
    -> outcome table task -> [reward per sample] -> avg@n, pass@k (k in ks), adapter figures
    -> results dict (and file): per family, overall micro/macro; samples.jsonl with every response

The results file is what `compare` reads; its per-task rewards make paired confidence intervals possible.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from k2sys.eval.adapters import Adapter, EvalItem, Score, get_adapter
from k2sys.eval.generators import ChatRequest
from k2sys.eval.passk import family_metrics, overall_metrics

__all__ = ["SuiteEntry", "SamplingConfig", "FamilyRun", "run_suite", "run_families", "parse_suite_arg",
           "write_json_atomic", "load_results", "RESULTS_SCHEMA"]

RESULTS_SCHEMA = "k2sys.eval/1"


@dataclass(kw_only=True)
class SuiteEntry:
    adapter: str
    path: str
    family: str = ""
    """Label in the report; the adapter name when empty (two files of one adapter need two labels)."""
    limit: int | None = None

    def __post_init__(self) -> None:
        self.family = self.family or self.adapter
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"suite {self.family}: limit must be >= 1, got {self.limit}")


def parse_suite_arg(text: str) -> SuiteEntry:
    """'ADAPTER=PATH' or 'ADAPTER:LABEL=PATH' (e.g. math:math500=/data/MATH-500/test.jsonl)."""
    if "=" not in text:
        raise ValueError(f"--suite {text!r}: expected ADAPTER=PATH or ADAPTER:LABEL=PATH, e.g. gsm8k=test.jsonl")
    head, path = text.split("=", 1)
    adapter, _, label = head.partition(":")
    return SuiteEntry(adapter=adapter.strip(), family=label.strip(), path=path.strip())


@dataclass(kw_only=True)
class SamplingConfig:
    n: int = 1
    """Samples per task (avg@n and pass@k for k <= n)."""
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    ks: tuple[int, ...] = (1,)
    threshold: float = 1.0
    """A sample counts as correct for pass@k when its reward reaches this."""
    concurrency: int = 16
    """Episodes played at once (text requests are batched by the generator)."""

    def validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature: must be >= 0, got {self.temperature}")
        if self.temperature == 0 and self.n > 1:
            raise ValueError(f"n={self.n} with temperature 0: greedy samples are identical; use --temperature > 0 "
                             "or --n 1")
        bad = [k for k in self.ks if not 1 <= k <= self.n]
        if bad or not self.ks:
            raise ValueError(f"ks: {list(self.ks)} must be non-empty and within [1, n={self.n}]; raise --n")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_results(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path}: not a k2sys eval results file (schema {RESULTS_SCHEMA!r}); "
                         "write one with `k2sys eval MODEL --suite ... --out DIR`")
    return data


def _seed(cfg: SamplingConfig, item: int, sample: int) -> int:
    return cfg.seed + 7919 * item + sample


@dataclass(kw_only=True)
class FamilyRun:
    """One family of a run: its scored items, however they were obtained (a benchmark file through its
    adapter in run_suite; a recipe's held-out tasks in k2sys.eval.harness)."""
    family: str
    adapter: Adapter
    items: list[EvalItem]
    path: str = ""
    """Where the items came from (kept in the results file)."""
    max_tokens: int | None = None
    """This family's response cap (per turn for episodes); None = SamplingConfig.max_tokens."""


def _text_family(generator: Any, adapter: Adapter, items: list[EvalItem], cfg: SamplingConfig, max_tokens: int,
                 chunk: int) -> list[tuple[EvalItem, int, str, str, Score]]:
    jobs = [(i, j) for i in range(len(items)) for j in range(cfg.n)]
    out = []
    for start in range(0, len(jobs), chunk):
        part = jobs[start:start + chunk]
        reqs = [ChatRequest(messages=items[i].messages, temperature=cfg.temperature, top_p=cfg.top_p,
                            max_tokens=max_tokens, seed=_seed(cfg, i, j)) for i, j in part]
        comps = generator.chat(reqs)
        if len(comps) != len(reqs):
            raise RuntimeError(f"generator returned {len(comps)} completions for {len(reqs)} requests")
        # adapters that score like an RL reward give a response cut before its stop token 0, unscored
        keep = [k for k, c in enumerate(comps) if not (adapter.cut_scores_zero and c.finish_reason != "stop")]
        scored = adapter.score_many([items[part[k][0]] for k in keep], [comps[k].text for k in keep])
        scores = [Score(0.0, detail={"cut": c.finish_reason}) for c in comps]
        for k, s in zip(keep, scored):
            scores[k] = s
        out += [(items[i], j, c.text, c.finish_reason, s) for (i, j), c, s in zip(part, comps, scores)]
    return out


def _episode_family(generator: Any, adapter: Adapter, items: list[EvalItem], cfg: SamplingConfig,
                    max_tokens: int) -> list[tuple[EvalItem, int, str, str, Score]]:
    from k2sys.eval.tau import run_chat_episodes

    jobs = [(i, j) for i in range(len(items)) for j in range(cfg.n)]
    specs, seeds = [adapter.spec(items[i]) for i, _ in jobs], [_seed(cfg, i, j) for i, j in jobs]
    # a generator that plays episodes itself (the in-process engine: token level, as RL plays them);
    # any other generator plays them message by message
    play = getattr(generator, "play_episodes", None)
    if play is not None:
        res = play(specs, seeds, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=max_tokens)
    else:
        res = run_chat_episodes(generator, specs, seeds, temperature=cfg.temperature, top_p=cfg.top_p,
                                max_tokens=max_tokens, concurrency=cfg.concurrency)
    out = []
    for (i, j), r in zip(jobs, res):
        s = Score(r["reward"], extras={"turns": float(r["turns"]), "truncated": float(r["truncated"])},
                  detail=r["info"])
        out.append((items[i], j, json.dumps(r["messages"], ensure_ascii=False), r["finish_reason"], s))
    return out


def run_suite(generator: Any, entries: Sequence[SuiteEntry], cfg: SamplingConfig, *, model: str = "",
              out_dir: str | Path | None = None, adapter_options: dict[str, dict] | None = None,
              log: Callable[[str], None] = lambda s: None, chunk: int = 512) -> dict:
    """Evaluate `generator` on every suite entry; returns the results dict (also written to
    out_dir/results.json with out_dir/samples.jsonl when out_dir is given)."""
    cfg.validate()
    labels = [e.family for e in entries]
    if not entries or len(set(labels)) != len(labels):
        raise ValueError(f"suite: needs at least one entry and distinct family labels, got {labels}; "
                         "label repeats as ADAPTER:LABEL=PATH")
    runs = []
    for e in entries:  # all files read before any call
        adapter = get_adapter(e.adapter, **(adapter_options or {}).get(e.adapter, {}))
        runs.append(FamilyRun(family=e.family, adapter=adapter, items=adapter.load(e.path, e.limit), path=str(e.path)))
    return run_families(generator, runs, cfg, model=model, out_dir=out_dir, log=log, chunk=chunk)


def run_families(generator: Any, runs: Sequence[FamilyRun], cfg: SamplingConfig, *, model: str = "",
                 out_dir: str | Path | None = None, log: Callable[[str], None] = lambda s: None,
                 chunk: int = 512) -> dict:
    """The harness proper: n samples of every item of every family -> outcome tables -> avg@n, pass@k and
    adapter figures per family, micro/macro overall -> the results dict (RESULTS_SCHEMA); with out_dir,
    results.json and samples.jsonl (every response) are written there, each atomically."""
    cfg.validate()
    labels = [r.family for r in runs]
    if not runs or len(set(labels)) != len(labels):
        raise ValueError(f"run_families: needs at least one family and distinct labels, got {labels}")
    for r in runs:
        if not r.items:
            raise ValueError(f"family {r.family}: no items to evaluate")
        if r.max_tokens is not None and r.max_tokens < 1:
            raise ValueError(f"family {r.family}: max_tokens must be >= 1, got {r.max_tokens}")
    samples_f = tmp_samples = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fd, tmp_samples = tempfile.mkstemp(dir=out_dir, prefix=".samples.jsonl.")
        samples_f = os.fdopen(fd, "w")
    families: dict[str, dict] = {}
    tables: dict[str, dict[str, list[float]]] = {}
    t0 = time.monotonic()
    try:
        for run in runs:
            adapter, items = run.adapter, run.items
            max_tokens = run.max_tokens or cfg.max_tokens
            log(f"{run.family}: {len(items)} tasks x {cfg.n} samples")
            t = time.monotonic()
            rows = (_episode_family(generator, adapter, items, cfg, max_tokens) if adapter.episodic
                    else _text_family(generator, adapter, items, cfg, max_tokens, chunk))
            table: dict[str, list[float]] = {it.id: [] for it in items}
            for item, j, text, finish, s in rows:
                table[item.id].append(float(s.reward))
                if samples_f is not None:
                    samples_f.write(json.dumps({"family": run.family, "task_id": item.id, "sample": j,
                                                "reward": s.reward, "finish_reason": finish, "response": text,
                                                "detail": s.detail}, ensure_ascii=False, default=str) + "\n")
            tables[run.family] = table
            metrics = family_metrics(table, cfg.ks, cfg.threshold)
            metrics.update(adapter.aggregate([r[4] for r in rows]))
            families[run.family] = {
                "adapter": adapter.name, "path": run.path, "n_tasks": len(items), "n": cfg.n,
                "max_tokens": max_tokens, "metrics": metrics,
                "truncated": sum(r[3] == "length" for r in rows) / max(len(rows), 1),
                "errors": sum(r[3] == "error" for r in rows) / max(len(rows), 1),
                "seconds": round(time.monotonic() - t, 3), "info": adapter.info(), "tasks": table}
            log(f"{run.family}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if samples_f is not None:
            samples_f.close()
            os.replace(tmp_samples, Path(out_dir) / "samples.jsonl")
            samples_f = None
    finally:
        if samples_f is not None:
            samples_f.close()
            os.unlink(tmp_samples)
    results = {"schema": RESULTS_SCHEMA, "model": model, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "sampling": asdict(cfg), "families": families,
               "overall": overall_metrics(tables, cfg.ks, cfg.threshold),
               "seconds": round(time.monotonic() - t0, 3)}
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "results.json", results)
    return results
