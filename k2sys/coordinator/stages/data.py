"""Data stage: tokenizer, train/held-out task splits and the SFT conversations (family rows, the user's
SFT data, environment trajectories that fit sft.seq_len), written atomically under <run>/data/."""

from __future__ import annotations

import logging
import random
from typing import Any

from k2sys.config import ConfigError
from k2sys.coordinator.stages import RecipeRunner, barrier
from k2sys.models.hf_io import write_json_atomic
from k2sys.tasks import Task
from k2sys.tasks.format import sft_rows
from k2sys.tokenizer import render_chat, tokenize_chat

log = logging.getLogger("k2sys.coordinator")


def build_data(run: RecipeRunner) -> None:
    from k2sys.data import write_chat_jsonl
    from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer

    data = run.dir / "data"
    if run.state.get("data_done") or run.rank != 0:
        barrier()  # pairs with rank 0's barrier after it built the data (or found it built)
        run.tok = load_tokenizer(run.tok_dir)
        return
    data.mkdir(exist_ok=True)
    env_rows = env_sft_rows(run)
    if run.model_path is None:
        # Environment conversations join the tokenizer corpus: tool JSON, code and chat structure
        # then cost a few tokens each instead of one per character.
        corpus = default_corpus() + [render_chat(r["messages"], r.get("tools"))
                                     for rows in env_rows.values() for r in rows[:1000]]
        train_tokenizer(corpus, run.cfg.tokenizer.vocab_size, run.tok_dir)
    run.tok = load_tokenizer(run.tok_dir)  # a checkpoint's own tokenizer and chat template when model.path
    c = run.cfg.tasks
    splits = {}
    user = user_tasks(run)
    for split, n, seed in (("train", c.n_train, run.cfg.seed), ("heldout", c.n_heldout, run.cfg.seed + 1)):
        splits[split] = {}
        for name, fam in run.families.items():
            tasks = user[split] if name == "user" else generate_upto(fam, n, seed, split)
            splits[split][name] = [t.to_dict() for t in tasks]
        write_json_atomic(data / f"{split}.json", splits[split])
    rows = []
    for name, fam in run.families.items():
        if name != "user":
            rows += sft_rows(fam, [Task.from_dict(d) for d in splits["train"][name]])
    rows += user_sft_rows(run)
    for kind, kind_rows in env_rows.items():
        fit = [r for r in kind_rows
               if len(tokenize_chat(run.tok, r["messages"], r.get("tools"))[0]) <= run.cfg.sft.seq_len]
        run.metrics.log("data", 0, **{f"{kind}_rows": len(kind_rows), f"{kind}_rows_fit": len(fit)})
        rows += [{**r, "meta": {"family": kind}} for r in fit]
    random.Random(run.cfg.seed).shuffle(rows)
    write_chat_jsonl(data / "sft.jsonl", rows)
    run.save_state(data_done=True)
    barrier()


def user_tasks(run: RecipeRunner) -> dict[str, list[Task]]:
    """The user's RL prompts (data.rl_prompts), split into train and held-out by a hash of each prompt."""
    d = run.cfg.data
    if not d.rl_prompts:
        return {"train": [], "heldout": []}
    from k2sys.data.sources import load_prompts
    from k2sys.tasks.user import UserPrompts

    records, report = load_prompts(d.rl_prompts, prompt_key=d.prompt_key, label_key=d.label_key,
                                   messages_key=d.messages_key, split=d.split, max_bad_fraction=d.max_bad_fraction)
    log_report(run, "rl_prompts", report)
    unique = {r.id: r for r in records}  # duplicated rows count once
    order = sorted(unique)  # content hashes: a deterministic, order-free split
    held = set(order[: min(d.heldout, max(len(order) - 1, 0))])
    train = [unique[i] for i in order if i not in held]
    if not train:
        raise ConfigError(f"data.rl_prompts: {d.rl_prompts} has no usable prompt left for training")
    return {"train": UserPrompts.tasks_from_records(train),
            "heldout": UserPrompts.tasks_from_records([unique[i] for i in order if i in held])}


def user_sft_rows(run: RecipeRunner) -> list[dict]:
    d = run.cfg.data
    if not d.sft:
        return []
    from k2sys.data.sources import load_chat_rows

    rows, report = load_chat_rows(d.sft, messages_key=d.sft_messages_key, split=d.split)
    log_report(run, "sft_data", report)
    report.check(d.max_bad_fraction)
    return [r.to_json() for r in rows]


def log_report(run: RecipeRunner, what: str, report: Any) -> None:
    if report.n_bad:
        log.warning("%s: %s", what, report.summary())
    run.metrics.log("data", 0, **{f"{what}_rows": report.n_ok, f"{what}_bad_rows": report.n_bad})
    write_json_atomic(run.dir / "data" / f"{what}_report.json", report.to_dict())


def env_sft_rows(run: RecipeRunner) -> dict[str, list[dict]]:
    """SFT conversations of the train tasks of each environment kind (the tasks RL plays later):
    judged synthetic trajectories for tool use, the reference program for code."""
    c, out = run.cfg.tasks, {}
    if c.tool_use:
        from k2sys.data.synth.pipeline import synthesize_tool_use

        rows, stats, _ = synthesize_tool_use(c.tool_use, run.cfg.seed, failure_rate=c.tool_use_failure_rate)
        log.info("tool-use synthesis: %s", stats.to_dict())
        out["tool_use"] = [{"messages": r["messages"], "tools": r["tools"]} for r in rows]
    if c.code:
        from k2sys.envs.code import code_sft_rows, code_tasks

        out["code"] = code_sft_rows(code_tasks(c.code, run.cfg.seed))
    return out


def generate_upto(fam, n: int, seed: int, split: str) -> list[Task]:
    """fam.generate(n), or as many distinct tasks as the family has (small difficulty settings)."""
    try:
        return fam.generate(n, seed=seed, split=split)
    except ValueError as e:
        import re

        m = re.search(r"found only (\d+) distinct", str(e))
        if not m:
            raise
        return fam.generate(int(m.group(1)), seed=seed, split=split)
