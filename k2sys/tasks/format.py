"""How a task meets the model: one user turn in the chat template, the answer as the assistant turn.

Shared by SFT data building, RL rollouts and evaluation so all three see the same tokens.
"""

from __future__ import annotations

from typing import Any

from k2sys.tasks.base import Task, TaskFamily
from k2sys.tokenizer import STOP_TOKENS, render_chat


def task_messages(task: Task, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": task.prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def prompt_ids(tokenizer: Any, task: Task) -> list[int]:
    """Token ids of the rendered user turn plus the assistant generation prompt."""
    return tokenizer.encode(render_chat(task_messages(task), add_generation_prompt=True)).ids


def stop_token_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    return [i for i in ids if i is not None]


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


def sft_rows(family: TaskFamily, tasks: list[Task]) -> list[dict]:
    """Chat JSONL rows with the expert solution as the assistant turn."""
    return [{"messages": task_messages(t, family.expert_solution(t)), "meta": {"family": family.name}}
            for t in tasks]
