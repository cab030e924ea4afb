"""Difficulty filter (seed section 5): sample each train prompt rl.filter_samples times on the SFT
model and keep those neither always nor never solved; judged (critic-scored) families pass unfiltered."""

from __future__ import annotations

import json
import random

from k2sys.coordinator.stages import RecipeRunner
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams
from k2sys.models.hf_io import write_json_atomic
from k2sys.rl import DifficultyFilter
from k2sys.tasks import Task
from k2sys.tasks.format import prompt_ids, score_many, stop_token_ids


def difficulty_filter(run: RecipeRunner) -> list[Task]:
    path = run.dir / "data" / "rl_prompts.json"
    if path.exists():
        return [Task.from_dict(d) for d in json.loads(path.read_text())]
    r = run.cfg.rl
    flt = DifficultyFilter(k=r.filter_k, low=r.filter_low, high=r.filter_high)
    train = run.tasks("train")
    rng = random.Random(run.cfg.seed + 2)
    pool = [t for f in run.families for t in train[f]]
    if r.filter_prompts == 0:  # no filter: every train prompt is used
        write_json_atomic(path, [t.to_dict() for t in pool])
        return pool
    rng.shuffle(pool)
    pool = pool[: r.filter_prompts]
    # a judged family (critic-scored) has no solved sample: its prompts pass unfiltered
    judged = [t for t in pool if not run.families[t.family].verifiable]
    pool = [t for t in pool if run.families[t.family].verifiable]
    if not pool:
        write_json_atomic(path, [t.to_dict() for t in judged])
        return judged
    stops = stop_token_ids(run.tok)
    n = r.filter_samples
    reqs = [GenerateRequest(input_ids=tuple(prompt_ids(run.tok, t)),
                            sampling=SamplingParams(temperature=r.t_start, max_new_tokens=r.budgets[t.family],
                                                    stop_token_ids=tuple(stops), n=n, sampling_seed=i))
            for i, t in enumerate(pool)]
    outs = run.engine_call(lambda: run.engine.client.generate(reqs))
    rewards = score_many([(run.families[t.family], t, o.output_ids, o.finish_reason)
                          for i, t in enumerate(pool) for o in outs[i * n:(i + 1) * n]], run.tok, stops)
    correct = [sum(r >= 1.0 for r in rewards[i * n:(i + 1) * n]) for i in range(len(pool))]
    res = flt([n] * len(pool), correct)
    kept = [pool[i] for i in res.keep] + judged
    write_json_atomic(path, [t.to_dict() for t in kept])
    run.metrics.log("filter", 0, **res.stats(), **{"filter/judged_unfiltered": len(judged)})
    if not kept:
        raise RuntimeError("difficulty filter kept no prompt: widen rl.filter_low/filter_high")
    return kept
