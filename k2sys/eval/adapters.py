"""Benchmark adapters: public benchmark files (local disk, their published layouts) -> chat items -> scores.

    file -> read_records (.jsonl, .jsonl.gz, .json list/object, or a folder of .json files)
         -> Adapter.load: EvalItem(id, messages, reference, meta)     (a bad row raises naming file:line)
    completion text -> Adapter.score -> Score(reward in [0, 1], extras, detail)

    gsm8k      {"question", "answer": "...#### 72"}                     reward = numeric match of the final answer
    math       {"problem", "solution" (with \\boxed{}), "level"?, "type"?, "answer"?}  (MATH folders, MATH-500)
    ifeval     {"key", "prompt", "instruction_id_list", "kwargs"}       reward = prompt-level strict
    humaneval  {"task_id", "prompt", "canonical_solution", "test", "entry_point"}   tests in the sandbox
    mbpp       {"task_id", "text" | "prompt", "code", "test_list", "test_setup_code"?, "test_imports"?}
    tau        tau-bench-style episodes (k2sys.eval.tau); scored by playing the episode, not by text

Code is only ever run inside the bubblewrap sandbox (k2sys.rewards.sandbox); an adapter that needs it
refuses to start where the sandbox is unusable, it never falls back to the host.
"""

from __future__ import annotations

import gzip
import json
import re
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

from k2sys.eval.answers import extract_gsm8k_answer, extract_math_answer, gsm8k_reference, last_boxed, math_equal
from k2sys.eval.answers import numbers_equal
from k2sys.rewards.ifeval import LANGUAGE_DETECTOR, check_row

__all__ = ["EvalItem", "Score", "Adapter", "ADAPTERS", "get_adapter", "read_records", "GSM8K", "MATH", "IFEval",
           "HumanEval", "MBPP", "Tau", "humaneval_program", "mbpp_program"]


@dataclass(kw_only=True)
class EvalItem:
    id: str
    messages: list[dict]
    reference: Any = None
    meta: dict = field(default_factory=dict)


@dataclass
class Score:
    reward: float
    extras: dict[str, float] = field(default_factory=dict)
    """Per-sample figures the family averages (e.g. IFEval's loose accuracy)."""
    detail: dict = field(default_factory=dict)
    """What the scorer saw (extracted answer, test outcome), kept in the samples file."""


def _file_records(p: Path) -> list[dict]:
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        if p.suffix == ".json":
            data = json.load(f)
            return data if isinstance(data, list) else [data]
        rows = []
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{i}: not JSON ({e.msg}); expected one JSON object per line") from None
        return rows


def read_records(path: str | Path) -> Iterator[tuple[str, dict]]:
    """(where, record) of every record in a benchmark file or folder, in a stable order. `where` is
    'file:index'; in a folder of one-object .json files (MATH's layout) it is the relative path."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".json", ".jsonl") or f.name.endswith(".jsonl.gz"))
        if not files:
            raise FileNotFoundError(f"{p}: no .json/.jsonl files under this folder")
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"{p}: no such benchmark file or folder")
    for f in files:
        rows = _file_records(f)
        rel = f.relative_to(p) if p.is_dir() else f
        for i, rec in enumerate(rows):
            single = p.is_dir() and f.suffix == ".json" and len(rows) == 1
            yield (str(rel) if single else f"{rel}:{i}"), rec


def _need(rec: dict, where: str, *keys: str, kind: type | tuple = str) -> None:
    for k in keys:
        if not isinstance(rec.get(k), kind):
            raise ValueError(f"{where}: field {k!r} must be {getattr(kind, '__name__', kind)}, got "
                             f"{type(rec.get(k)).__name__}; is this the benchmark's published file?")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class Adapter(ABC):
    name: ClassVar[str]
    episodic: ClassVar[bool] = False
    """True: items are environment episodes (Adapter.spec), played turn by turn instead of scored as text."""
    cut_scores_zero: ClassVar[bool] = False
    """True: a response cut before its stop token (finish_reason length/error) scores 0 without being
    scored, as RL rewards do (the recipe's task families); benchmarks score cut text as it is."""

    def load(self, path: str | Path, limit: int | None = None) -> list[EvalItem]:
        items = []
        for where, rec in read_records(path):
            if limit is not None and len(items) >= limit:
                break
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            items.append(self.item(where, rec, len(items)))
        if not items:
            raise ValueError(f"{path}: no {self.name} rows")
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path}: duplicate item ids, e.g. {next(i for i in ids if ids.count(i) > 1)!r}")
        return items

    @abstractmethod
    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        """One record in the benchmark's layout -> an EvalItem."""

    def score(self, item: EvalItem, text: str) -> Score:
        raise NotImplementedError(f"{self.name} items are scored by score_many")

    def score_many(self, items: list[EvalItem], texts: list[str]) -> list[Score]:
        return [self.score(i, t) for i, t in zip(items, texts)]

    def aggregate(self, scores: list[Score]) -> dict[str, float]:
        """Family figures beyond avg@n/pass@k: by default the mean of each per-sample extra."""
        keys = sorted({k for s in scores for k in s.extras})
        return {k: sum(s.extras.get(k, 0.0) for s in scores) / len(scores) for k in keys} if scores else {}

    def info(self) -> dict:
        return {}


class GSM8K(Adapter):
    name = "gsm8k"
    SUFFIX = "\nSolve the problem step by step. On the last line write the final answer as '#### <number>'."

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        _need(rec, where, "question", "answer")
        return EvalItem(id=str(rec.get("id", index)), messages=_user(rec["question"] + self.SUFFIX),
                        reference=gsm8k_reference(rec["answer"]))

    def score(self, item: EvalItem, text: str) -> Score:
        got = extract_gsm8k_answer(text)
        return Score(float(numbers_equal(got, item.reference)), detail={"extracted": got})


class MATH(Adapter):
    name = "math"
    SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        _need(rec, where, "problem")
        ref = rec.get("answer")
        if not isinstance(ref, str) or not ref.strip():
            _need(rec, where, "solution")
            ref = last_boxed(rec["solution"])
            if ref is None:
                raise ValueError(f"{where}: the solution has no \\boxed{{...}} answer")
        tid = rec.get("unique_id") or (where if not where.rsplit(":", 1)[-1].isdigit() else str(index))
        return EvalItem(id=str(tid), messages=_user(rec["problem"] + self.SUFFIX), reference=ref,
                        meta={k: rec[k] for k in ("level", "type", "subject") if k in rec})

    def score(self, item: EvalItem, text: str) -> Score:
        got = extract_math_answer(text)
        return Score(float(math_equal(got, item.reference)), detail={"extracted": got})


class IFEval(Adapter):
    name = "ifeval"

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        _need(rec, where, "prompt")
        _need(rec, where, "instruction_id_list", "kwargs", kind=list)
        check_row(rec["instruction_id_list"], rec["kwargs"], "x")  # unknown ids, missing kwargs: now, not mid-run
        return EvalItem(id=str(rec.get("key", index)), messages=_user(rec["prompt"]),
                        reference={"ids": rec["instruction_id_list"], "kwargs": rec["kwargs"]})

    def score(self, item: EvalItem, text: str) -> Score:
        res = check_row(item.reference["ids"], item.reference["kwargs"], text)
        s, lo = res["strict"], res["loose"]
        return Score(float(all(s)), extras={"prompt_strict": float(all(s)), "prompt_loose": float(all(lo)),
                                            "inst_strict_hits": float(sum(s)), "inst_loose_hits": float(sum(lo)),
                                            "inst_total": float(len(s))}, detail=res)

    def aggregate(self, scores: list[Score]) -> dict[str, float]:
        if not scores:
            return {}
        total = sum(s.extras["inst_total"] for s in scores) or 1.0
        return {"prompt_strict": sum(s.extras["prompt_strict"] for s in scores) / len(scores),
                "prompt_loose": sum(s.extras["prompt_loose"] for s in scores) / len(scores),
                "inst_strict": sum(s.extras["inst_strict_hits"] for s in scores) / total,
                "inst_loose": sum(s.extras["inst_loose_hits"] for s in scores) / total}

    def info(self) -> dict:
        return {"language_detector": LANGUAGE_DETECTOR}


# ---------------------------------------------------------------- code (sandboxed)

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*?)```", re.DOTALL)


def _code_of(text: str) -> str:
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1]
    open_fence = re.search(r"```[A-Za-z0-9_+-]*[ \t]*\n(.*)$", text, re.DOTALL)  # cut before the closing fence
    return open_fence.group(1) if open_fence else text


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program the sandbox runs: the prompt (imports, helpers, signature), the model's code (a whole
    function redefines the entry point; a bare body continues the prompt), the tests, check(entry_point)."""
    code = _code_of(completion)
    if re.search(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        body = prompt + "\n    pass\n\n" + code
    else:
        body = prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def mbpp_program(completion: str, tests: list[str], setup: str = "") -> str:
    return f"{setup}\n{_code_of(completion)}\n\n" + "\n".join(tests) + "\n"


class _Sandboxed(Adapter):
    def __init__(self, *, time_limit_s: float = 10.0, memory_limit_mb: int = 1024, threads: int = 4):
        from k2sys.rewards.sandbox import SandboxConfig, SandboxUnavailable, bwrap_available

        self.config = SandboxConfig(time_limit_s=time_limit_s, memory_limit_mb=memory_limit_mb)
        ok, why = bwrap_available(self.config.bwrap)
        if not ok:
            raise SandboxUnavailable(f"{self.name}: tests run model code only inside the bubblewrap sandbox, "
                                     f"which is not usable here: {why}")
        self.threads = max(1, threads)

    @abstractmethod
    def program(self, item: EvalItem, text: str) -> str: ...

    def _run(self, program: str) -> Score:
        from k2sys.rewards.sandbox import run_python

        res = run_python(program, "", self.config)
        tail = (res.stderr.strip().splitlines() or [""])[-1][:300]
        return Score(float(res.ok), detail={"returncode": res.returncode, "timed_out": res.timed_out, "error": tail})

    def score(self, item: EvalItem, text: str) -> Score:
        return self._run(self.program(item, text))

    def score_many(self, items: list[EvalItem], texts: list[str]) -> list[Score]:
        programs = [self.program(i, t) for i, t in zip(items, texts)]
        with ThreadPoolExecutor(min(self.threads, max(1, len(programs)))) as pool:
            return list(pool.map(self._run, programs))

    def info(self) -> dict:
        return {"sandbox": {"time_limit_s": self.config.time_limit_s, "memory_limit_mb": self.config.memory_limit_mb}}


class HumanEval(_Sandboxed):
    name = "humaneval"
    INSTRUCTION = ("Complete the following Python function. Reply with the complete function (with its imports) "
                   "in one ```python code block.\n\n```python\n{prompt}```")

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        _need(rec, where, "task_id", "prompt", "test", "entry_point")
        return EvalItem(id=rec["task_id"], messages=_user(self.INSTRUCTION.format(prompt=rec["prompt"])),
                        reference={"prompt": rec["prompt"], "test": rec["test"], "entry_point": rec["entry_point"]})

    def program(self, item: EvalItem, text: str) -> str:
        r = item.reference
        return humaneval_program(r["prompt"], text, r["test"], r["entry_point"])


class MBPP(_Sandboxed):
    name = "mbpp"
    INSTRUCTION = ("You are an expert Python programmer, and here is your task: {text} Your code should pass "
                   "these tests:\n\n{tests}\n\nReply with the code in one ```python code block.")

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        text = rec.get("text") if isinstance(rec.get("text"), str) else rec.get("prompt")
        if not isinstance(text, str):
            raise ValueError(f"{where}: MBPP row needs 'text' (mbpp.jsonl) or 'prompt' (sanitized MBPP)")
        _need(rec, where, "test_list", kind=list)
        setup = "\n".join([rec.get("test_setup_code") or "", *rec.get("test_imports", [])]).strip()
        return EvalItem(id=str(rec.get("task_id", index)),
                        messages=_user(self.INSTRUCTION.format(text=text, tests="\n".join(rec["test_list"]))),
                        reference={"tests": rec["test_list"], "setup": setup})

    def program(self, item: EvalItem, text: str) -> str:
        return mbpp_program(text, item.reference["tests"], item.reference["setup"])


# ---------------------------------------------------------------- episodes

class Tau(Adapter):
    name = "tau"
    episodic = True

    def item(self, where: str, rec: dict, index: int) -> EvalItem:
        from k2sys.eval.tau import validate_tau_row

        row = validate_tau_row(rec, where)
        return EvalItem(id=str(row.get("task_id", index)), messages=[], reference=row)

    def spec(self, item: EvalItem) -> dict:
        from k2sys.eval.tau import tau_spec

        return tau_spec(item.reference)


ADAPTERS: dict[str, type[Adapter]] = {a.name: a for a in (GSM8K, MATH, IFEval, HumanEval, MBPP, Tau)}


def get_adapter(name: str, **options: Any) -> Adapter:
    if name not in ADAPTERS:
        raise KeyError(f"unknown benchmark adapter {name!r}; known: {sorted(ADAPTERS)}")
    cls = ADAPTERS[name]
    return cls(**options) if issubclass(cls, _Sandboxed) else cls()
