"""How a task meets the model: one user turn in the chat template, the answer as the assistant turn.

Shared by SFT data building, RL rollouts and evaluation so all three see the same tokens.
"""

from __future__ import annotations

from typing import Any

from k2sys.tasks.base import Task, TaskFamily
from k2sys.tokenizer import chat_format_for


def task_messages(task: Task, answer: str | None = None) -> list[dict]:
    """The conversation of a task: its own message list when it has one (user data), else one user turn."""
    msgs = [dict(m) for m in task.meta["messages"]] if "messages" in task.meta else [{"role": "user", "content": task.prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def prompt_ids(tokenizer: Any, task: Task) -> list[int]:
    """Token ids of the rendered user turn plus the assistant generation prompt, in the tokenizer's chat
    format (the checkpoint's own template, or our K2 format; k2sys.tokenizer.formats)."""
    return chat_format_for(tokenizer).prompt_ids(task_messages(task))


def stop_token_ids(tokenizer: Any) -> list[int]:
    """End-of-turn / eos ids of the tokenizer's chat format."""
    return list(chat_format_for(tokenizer).stop_token_ids)


def response_text(tokenizer: Any, output_ids: list[int] | tuple[int, ...], stop_ids: list[int]) -> str:
    """Decoded response without its stop token."""
    ids = list(output_ids)
    if ids and ids[-1] in stop_ids:
        ids = ids[:-1]
    return tokenizer.decode(ids, skip_special_tokens=False)


def score(family: TaskFamily, task: Task, tokenizer: Any, output_ids, finish_reason: str | None,
          stop_ids: list[int]) -> float:
    """Verifier reward; a response that did not end with a stop token (cut by length or abort) gets 0."""
    if finish_reason != "stop":
        return 0.0
    return family.verify(task, response_text(tokenizer, output_ids, stop_ids))


def score_many(items: list[tuple[TaskFamily, Task, Any, str | None]], tokenizer: Any,
               stop_ids: list[int]) -> list[float]:
    """score() of many (family, task, output_ids, finish_reason) at once: one verify_batch call per
    family (a reward service sees whole batches, not one request per sample)."""
    out = [0.0] * len(items)
    by_family: dict[int, list[int]] = {}
    for i, (fam, _, _, finish) in enumerate(items):
        if finish == "stop":
            by_family.setdefault(id(fam), []).append(i)
    for idx in by_family.values():
        fam = items[idx[0]][0]
        rewards = fam.verify_batch([items[i][1] for i in idx],
                                   [response_text(tokenizer, items[i][2], stop_ids) for i in idx])
        for i, r in zip(idx, rewards):
            out[i] = float(r)
    return out


def sft_rows(family: TaskFamily, tasks: list[Task]) -> list[dict]:
    """Chat JSONL rows with the expert solution as the assistant turn."""
    return [{"messages": task_messages(t, family.expert_solution(t)), "meta": {"family": family.name}}
            for t in tasks]
