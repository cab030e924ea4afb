"""Continuous batching: requests join the running batch every step, prefill is chunked, and a
step never processes more than `max_num_batched_tokens` tokens.

One step:  decode tokens of running sequences (1 each, oldest first)
        -> prefill chunks of partly prefilled sequences
        -> admit waiting requests FCFS while budget, blocks and the running cap allow
        -> one forward over all of it -> sample -> stop checks -> stream updates.
Decode goes first so long prompts cannot starve short generations (fairness under mixed
lengths); prefill uses whatever budget is left. When the KV cache runs out, the newest running
sequence is retracted (blocks freed, tokens kept) and recomputed later.

A request with n samples prefills its prompt once; at the end of prefill it forks into n
sequences that share the prompt's full KV blocks (refcounts) and sample from the same logits.

Prefix caching (EngineConfig.enable_prefix_caching): every full block a sequence computes is
registered with the allocator under a chained key; an admitted sequence starts on the cached
blocks of its longest cached prefix and prefills only the rest. The next turn of a multi-turn
episode, a resumed partial rollout and a retracted sequence re-sending their context hit it.
A request with a cache salt chains its keys from the salt, so only requests with the same salt
share blocks.

Prompt log-probs (logprob_start_len >= 0) come out of the prefill itself: the rows of the prompt
positions that need them are reduced to log-probs in the same forward that yields the sampling
logits. Cached blocks skip prefill, so such a request reuses cached blocks only up to the first
position it still needs (as SGLang caps its prefix match at logprob_start_len); what is already
computed is kept across retractions.

Not thread-safe: the engine calls it from its scheduler thread only.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from k2sys.engine.core.config import EngineConfig, LogprobOptions, SamplingParams
from k2sys.engine.core.kv_cache import OutOfBlocks, PagedLatentCache
from k2sys.engine.core.model_runner import AttnGroup, ModelRunner, PromptLogprobSpec, StepBatch
from k2sys.engine.core.sampling import RowContext, sample

__all__ = ["Request", "Scheduler", "Sequence"]

log = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request: "Request"
    sample_idx: int
    tokens: list[int]
    """Prompt + generated tokens: the full context."""
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    """Tokens whose latent is in the cache."""
    finish_reason: dict | None = None
    text: str = ""
    order: int = field(default_factory=lambda: next(_ids))
    block_keys: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the leading full, computed blocks (registered with the allocator)."""
    cached_tokens: int = 0
    """Prompt tokens served from the prefix cache at the last admission."""
    output_top: list[list[tuple[float, int]]] = field(default_factory=list)
    """Per output token: the top_logprobs_num most likely (logprob, token id) of its distribution."""
    output_ids_lp: list[list[float]] = field(default_factory=list)
    """Per output token: the log-probs of the request's token_ids_logprob."""
    stop_regex_match: bool = False
    grammar: Any = None
    """The request's structured-output matcher (one per sample), when it has a grammar."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def snapshot(self, with_logprobs: bool = True) -> dict[str, Any]:
        return {"rid": self.request.sample_rid(self.sample_idx), "input_ids": list(self.request.input_ids),
                "output_ids": list(self.output_ids),
                "output_logprobs": list(self.output_logprobs) if with_logprobs else None,
                "finish_reason": self.finish_reason, "text": self.text}


@dataclass(eq=False)
class Request:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    return_logprob: bool = False
    listener: Callable[["Sequence", bool], None] | None = None
    """Called from the scheduler thread as listener(seq, finished) when a sequence advances."""
    seed: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    created: float = field(default_factory=time.time)
    logprobs: LogprobOptions | None = None
    """What log-probs to return (None: output token log-probs iff return_logprob)."""
    cache_root: bytes | None = None
    """Parent key of the first prefix-cache block (a cache salt); None = the shared root."""
    grammar_factory: Callable[[], Any] | None = None
    """Makes a fresh structured-output matcher for one sample (k2sys.engine.core.grammar)."""
    input_start: int | None = None
    """First prompt position reported in input_token_logprobs (None: no prompt log-probs)."""
    input_lp: list[float] = field(default_factory=list)
    """log p(prompt[p + 1] | prompt[:p + 1]) for p = input_start, input_start + 1, ... (filled by prefill)."""
    input_top: list[list[tuple[float, int]]] = field(default_factory=list)
    input_ids_lp: list[list[float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.logprobs is None:
            self.logprobs = LogprobOptions(return_logprob=self.return_logprob)
        self.return_logprob = self.logprobs.return_logprob
        self.input_start = self.logprobs.input_start(len(self.input_ids))

    def sample_rid(self, i: int) -> str:
        return self.rid if self.params.n == 1 else f"{self.rid}-{i}"

    def input_lp_next(self) -> int | None:
        """The next prompt position whose next-token log-prob is still to compute, or None."""
        if self.input_start is None:
            return None
        p = self.input_start + len(self.input_lp)
        return p if p <= len(self.input_ids) - 2 else None

    @property
    def finished(self) -> bool:
        return self.forked and all(s.finished for s in self.seqs) or (not self.forked and self.seqs[0].finished)


class Scheduler:
    def __init__(self, cfg: EngineConfig, runner: ModelRunner, cache: PagedLatentCache, max_model_len: int,
                 eos_token_id: int | None, detokenize: Callable[[list[int], bool], str] | None = None):
        self.cfg, self.runner, self.cache = cfg, runner, cache
        self.max_model_len, self.eos = max_model_len, eos_token_id
        self.detokenize = detokenize
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.requests: dict[str, Request] = {}
        self.generated_tokens = 0
        self.steps = 0
        self.retractions = 0
        self.cached_tokens = 0

    # ---- intake and removal ----------------------------------------------------------------
    def add(self, req: Request) -> None:
        if req.params.sampling_seed is None:
            req.seed = random.getrandbits(62)
        else:
            req.seed = req.params.sampling_seed
        seq = Sequence(request=req, sample_idx=0, tokens=list(req.input_ids))
        req.seqs = [seq]
        self.requests[req.rid] = req
        if req.params.max_new_tokens == 0 and req.input_lp_next() is None:
            self._finish_empty(seq)  # nothing to compute
            return
        if req.grammar_factory is not None:
            seq.grammar = req.grammar_factory()
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _release(self, seq: Sequence) -> None:
        if seq.blocks:
            self.cache.allocator.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.block_keys = [], 0, []

    # ---- prefix cache ------------------------------------------------------------------------
    def _match_prefix(self, seq: Sequence) -> None:
        """Start a sequence with no KV on the cached blocks of its longest cached prefix (whole
        blocks; the last token is always computed, since its logits are needed)."""
        if not self.cfg.enable_prefix_caching or seq.blocks:
            return
        alloc, bs = self.cache.allocator, self.cache.block_size
        parent = seq.request.cache_root
        usable = (len(seq.tokens) - 1) // bs
        need_from = seq.request.input_lp_next()
        if need_from is not None:  # positions from here on must run through the model
            usable = min(usable, need_from // bs)
        for j in range(usable):
            key = alloc.block_key(parent, seq.tokens[j * bs:(j + 1) * bs])
            b = alloc.lookup(key)
            if b is None:
                break
            seq.blocks.append(b)
            seq.block_keys.append(key)
            parent = key
        seq.num_computed = seq.cached_tokens = len(seq.blocks) * bs
        self.cached_tokens += seq.cached_tokens

    def _register_blocks(self, seq: Sequence) -> None:
        """Offer the sequence's newly completed full blocks to the prefix cache."""
        if not self.cfg.enable_prefix_caching:
            return
        alloc, bs = self.cache.allocator, self.cache.block_size
        for j in range(len(seq.block_keys), min(seq.num_computed // bs, len(seq.blocks))):
            parent = seq.block_keys[-1] if seq.block_keys else seq.request.cache_root
            key = alloc.block_key(parent, seq.tokens[j * bs:(j + 1) * bs])
            alloc.register(seq.blocks[j], key)
            seq.block_keys.append(key)

    def _finish(self, seq: Sequence, reason: dict) -> None:
        seq.finish_reason = reason
        self._release(seq)
        if seq in self.running:
            self.running.remove(seq)
        req = seq.request
        if self.detokenize is not None:
            try:
                seq.text = self._final_text(seq)
            except Exception as e:  # noqa: BLE001 - one request's text must not stop the others
                log.exception("request %s: final text failed", req.rid)
                seq.text = ""
                seq.finish_reason = {"type": "abort", "message": f"decoding the output failed: {type(e).__name__}: {e}"}
        self._notify(seq, True)
        if req.finished:
            self.requests.pop(req.rid, None)

    @staticmethod
    def _notify(seq: Sequence, finished: bool) -> None:
        """Call the request's listener; a listener that raises (its caller is gone) affects no other request."""
        if seq.request.listener is None:
            return
        try:
            seq.request.listener(seq, finished)
        except Exception:  # noqa: BLE001
            log.exception("request %s: listener failed", seq.request.rid)

    def _fail(self, seq: Sequence, what: str, e: BaseException) -> None:
        """End one sequence whose own processing raised: its request aborts with the reason, the rest run on."""
        log.exception("request %s: %s failed", seq.request.rid, what)
        if not seq.finished:
            self._finish(seq, {"type": "abort", "message": f"{what} failed: {type(e).__name__}: {e}"})

    def _finish_empty(self, seq: Sequence) -> None:
        """End a max_new_tokens=0 request: all n samples finish with no output (after its prefill,
        when it asked for prompt log-probs)."""
        req = seq.request
        req.forked = True
        for i in range(1, req.params.n):
            req.seqs.append(Sequence(request=req, sample_idx=i, tokens=list(req.input_ids),
                                     cached_tokens=seq.cached_tokens))
        for s in list(req.seqs):
            self._finish(s, {"type": "length", "length": 0})

    def abort(self, rid: str | None = None, message: str = "Abort requested") -> list[dict]:
        """Abort one request (rid) or all (None); returns the aborted sequences' snapshots."""
        reqs = list(self.requests.values()) if rid is None else [self.requests[rid]] if rid in self.requests else []
        out = []
        for req in reqs:
            for seq in list(req.seqs):
                if not seq.finished:
                    if seq in self.waiting:
                        self.waiting.remove(seq)
                    self._finish(seq, {"type": "abort", "message": message})
                    out.append(seq.snapshot())
        return out

    def retract_all(self) -> list[dict]:
        """Free every running sequence's KV; they stay queued (front) with their tokens."""
        out = []
        for seq in sorted(self.running, key=lambda s: s.order, reverse=True):
            self._retract(seq)
        for seq in self.waiting:
            out.append(seq.snapshot())
        return out

    def _retract(self, seq: Sequence) -> None:
        self.retractions += 1
        self._release(seq)
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    # ---- one step ----------------------------------------------------------------------------
    def _ensure_blocks(self, seq: Sequence, upto: int) -> None:
        need = self.cache.blocks_for(upto) - len(seq.blocks)
        if need > 0:
            seq.blocks.extend(self.cache.allocator.allocate(need))

    def _plan(self) -> list[tuple[Sequence, int]]:
        budget = self.cfg.max_num_batched_tokens
        plan: list[tuple[Sequence, int]] = []
        # running sequences: decode (1 pending token) first, then unfinished prefills
        for seq in sorted(self.running, key=lambda s: (len(s.tokens) - s.num_computed > 1, s.order)):
            if budget <= 0:
                break
            if seq not in self.running:  # retracted below to make room
                continue
            n = min(len(seq.tokens) - seq.num_computed, budget)
            placed = True
            while True:
                try:
                    self._ensure_blocks(seq, seq.num_computed + n)
                    break
                except OutOfBlocks:
                    victim = max((s for s in self.running if s is not seq and all(s is not p for p, _ in plan)),
                                 key=lambda s: s.order, default=None)
                    if victim is not None:
                        self._retract(victim)
                        continue
                    placed = False
                    if plan:  # the planned sequences hold the cache: this one waits for them
                        self._retract(seq)
                    else:  # alone and still out of blocks: it can never fit
                        self._finish(seq, {"type": "abort", "message": "the sequence outgrew the KV cache; raise "
                                           "EngineConfig.max_total_tokens or lower max_new_tokens"})
                    break
            if not placed:
                continue
            plan.append((seq, n))
            budget -= n
        # admissions
        computing = self._blocks_computed_by(plan)
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_running_requests:
            seq = self.waiting[0]
            self._match_prefix(seq)
            if computing and self._next_block_key(seq) in computing:
                # Its next block is being computed in this step by a planned sequence (requests sharing
                # a prompt prefix that arrive together, e.g. agent episodes with one system prompt):
                # wait a step and take it from the prefix cache rather than compute it again.
                self.cached_tokens -= seq.cached_tokens  # matched again, and counted, when admitted
                seq.cached_tokens = 0
                self._release(seq)
                break
            n = min(len(seq.tokens) - seq.num_computed, budget)
            # keep a block of headroom per running sequence so admissions do not force retractions
            headroom = len(self.running) + 1
            new_blocks = self.cache.blocks_for(seq.num_computed + n) - len(seq.blocks)
            if new_blocks + headroom > self.cache.allocator.num_free and self.running:
                self._release(seq)  # cached blocks go back to the cache; matched again next time
                break
            try:
                self._ensure_blocks(seq, seq.num_computed + n)
            except OutOfBlocks:
                self._release(seq)
                if not self.running:
                    self.waiting.popleft()
                    self._finish(seq, {"type": "abort", "message": "prompt does not fit in the KV cache; raise "
                                       "EngineConfig.max_total_tokens"})
                    continue
                break
            self.waiting.popleft()
            self.running.append(seq)
            plan.append((seq, n))
            budget -= n
            if computing is not None:
                computing |= self._blocks_computed_by([(seq, n)])
        return plan

    def _blocks_computed_by(self, plan: list[tuple[Sequence, int]]) -> set[bytes] | None:
        """Prefix-cache keys of the full blocks the planned prefills complete in this step (None with
        the prefix cache off)."""
        if not self.cfg.enable_prefix_caching:
            return None
        alloc, bs = self.cache.allocator, self.cache.block_size
        keys: set[bytes] = set()
        for seq, n in plan:
            if n <= 1:
                continue
            parent = seq.block_keys[-1] if seq.block_keys else seq.request.cache_root
            for j in range(len(seq.block_keys), (seq.num_computed + n) // bs):  # blocks this step completes
                parent = alloc.block_key(parent, seq.tokens[j * bs:(j + 1) * bs])
                keys.add(parent)
        return keys

    def _next_block_key(self, seq: Sequence) -> bytes | None:
        """The key of the first block of `seq` the prefix cache did not give it (None: no full block
        left before its last token, which always runs)."""
        bs = self.cache.block_size
        j = len(seq.block_keys)
        need_from = seq.request.input_lp_next()  # positions that must run for their log-probs anyway
        if (j + 1) * bs > len(seq.tokens) - 1 or (need_from is not None and need_from < (j + 1) * bs):
            return None
        parent = seq.block_keys[-1] if seq.block_keys else seq.request.cache_root
        return self.cache.allocator.block_key(parent, seq.tokens[j * bs:(j + 1) * bs])

    def step(self) -> int:
        """Run one forward step; returns the number of tokens processed (0 = nothing to do)."""
        plan = self._plan()
        if not plan:
            return 0
        try:
            return self._run(plan)
        except Exception as e:  # noqa: BLE001 - find the request that breaks the batch; the rest run on
            if len(plan) == 1:
                self._fail(plan[0][0], "forward", e)
                return 0
            log.warning("batched forward of %d sequences failed (%s: %s); running them one by one",
                        len(plan), type(e).__name__, e)
        done = 0
        for seq, n in plan:  # a retry recomputes the same positions: KV slots are overwritten, not appended
            if seq.finished:
                continue
            try:
                done += self._run([(seq, n)])
            except Exception as e:  # noqa: BLE001
                self._fail(seq, "forward", e)
        return done

    def _run(self, plan: list[tuple[Sequence, int]]) -> int:
        """One forward over `plan` (sequence, tokens to compute) and the sampling that follows."""
        bs = self.cache.block_size
        dev = self.runner.device
        ids, pos, slots, logit_rows, samplers = [], [], [], [], []
        decode, prefill = [], []
        lp_rows, lp_targets, lp_owners = [], [], []
        row = 0
        for seq, n in plan:
            start = seq.num_computed
            nxt = seq.request.input_lp_next()
            if nxt is not None:
                if start > nxt:
                    raise RuntimeError(f"request {seq.request.rid}: prompt position {nxt} needs log-probs but "
                                       f"prefill starts at {start}")
                end = min(start + n, len(seq.request.input_ids) - 1)  # positions whose next token is in the prompt
                if end > nxt:
                    lp_rows.extend(range(row + nxt - start, row + end - start))
                    lp_targets.extend(seq.tokens[nxt + 1:end + 1])
                    lp_owners.append((seq.request, end - nxt))
            ids.extend(seq.tokens[start:start + n])
            positions = range(start, start + n)
            pos.extend(positions)
            slots.extend(seq.blocks[p // bs] * bs + p % bs for p in positions)
            (decode if n == 1 else prefill).append((seq, row, n, start + n))
            if start + n == len(seq.tokens):
                logit_rows.append(row + n - 1)
                samplers.append(seq)
            row += n
        groups = []
        for members in (decode, prefill):
            if not members:
                continue
            Q = max(n for _, _, n, _ in members)
            nb = max(len(s.blocks) for s, _, _, _ in members)
            rows = [[r + min(i, n - 1) for i in range(Q)] for _, r, n, _ in members]
            qpos = [[(c - n + i) if i < n else 0 for i in range(Q)] for _, _, n, c in members]
            valid = [[i < n for i in range(Q)] for _, _, n, _ in members]
            tables = [s.blocks + [0] * (nb - len(s.blocks)) for s, _, _, _ in members]
            groups.append(AttnGroup(rows=torch.tensor(rows, device=dev), qpos=torch.tensor(qpos, device=dev),
                                    block_tables=torch.tensor(tables, device=dev),
                                    ctx_len=torch.tensor([c for _, _, _, c in members], device=dev),
                                    valid=torch.tensor(valid, device=dev)))
        spec = None
        if lp_rows:
            k = max(r.logprobs.top_logprobs_num for r, _ in lp_owners)
            wanted = sorted({t for r, _ in lp_owners for t in (r.logprobs.token_ids_logprob or ())})
            spec = PromptLogprobSpec(rows=torch.tensor(lp_rows, device=dev), targets=torch.tensor(lp_targets, device=dev),
                                     top_k=k, token_ids=torch.tensor(wanted, device=dev, dtype=torch.long)
                                     if any(r.logprobs.token_ids_logprob is not None for r, _ in lp_owners) else None)
        batch = StepBatch(input_ids=torch.tensor(ids, device=dev), positions=torch.tensor(pos, device=dev),
                          slots=torch.tensor(slots, device=dev), groups=groups,
                          logit_rows=torch.tensor(logit_rows, device=dev, dtype=torch.long), prompt_logprobs=spec)
        logits, prompt_lp = self.runner.forward_with_prompt_logprobs(batch, self.cache)
        if spec is not None:
            self._store_prompt_logprobs(lp_owners, prompt_lp, spec)
        for seq, n in plan:
            seq.num_computed += n
            self._register_blocks(seq)
        self.steps += 1
        self._sample_and_advance(samplers, logits)
        return row

    @staticmethod
    def _store_prompt_logprobs(owners: list[tuple[Request, int]], out: Any, spec: PromptLogprobSpec) -> None:
        target = out.target.tolist()
        top_v = out.top_values.tolist() if out.top_values is not None else None
        top_i = out.top_ids.tolist() if out.top_ids is not None else None
        by_id = out.token_ids.tolist() if out.token_ids is not None else None
        column = {t: j for j, t in enumerate(spec.token_ids.tolist())} if spec.token_ids is not None else {}
        off = 0
        for req, count in owners:
            req.input_lp.extend(target[off:off + count])
            k = req.logprobs.top_logprobs_num
            if k:
                req.input_top.extend([list(zip(top_v[r][:k], top_i[r][:k])) for r in range(off, off + count)])
            if req.logprobs.token_ids_logprob is not None:
                cols = [column[t] for t in req.logprobs.token_ids_logprob]
                req.input_ids_lp.extend([[by_id[r][c] for c in cols] for r in range(off, off + count)])
            off += count

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """End of a prompt's prefill with n > 1: n sequences sharing the full prompt blocks."""
        req = seq.request
        req.forked = True
        if req.params.n == 1:
            return [seq]
        bs = self.cache.block_size
        full = seq.num_computed // bs
        out = [seq]
        for i in range(1, req.params.n):
            child = Sequence(request=req, sample_idx=i, tokens=list(seq.tokens), num_computed=seq.num_computed,
                             cached_tokens=seq.cached_tokens,
                             grammar=req.grammar_factory() if req.grammar_factory is not None else None)
            child.blocks = self.cache.allocator.share(seq.blocks[:full])
            child.block_keys = list(seq.block_keys[:full])
            if full < len(seq.blocks):  # partial last block: private copy so appends never collide
                try:
                    (b,) = self.cache.allocator.allocate(1)
                except OutOfBlocks:
                    self.cache.allocator.release(child.blocks)
                    child.blocks, child.num_computed, child.block_keys = [], 0, []
                    self.waiting.append(child)  # recompute it alone later
                    req.seqs.append(child)
                    continue
                self.cache.copy_block(seq.blocks[full], b)
                child.blocks.append(b)
            req.seqs.append(child)
            self.running.append(child)
            out.append(child)
        return out

    def _sample_and_advance(self, samplers: list[Sequence], logits: torch.Tensor) -> None:
        rows, seqs = [], []
        for r, seq in enumerate(samplers):
            if seq.request.params.max_new_tokens == 0:  # prefilled for its prompt log-probs only
                self._finish_empty(seq)
                continue
            group = self._fork(seq) if not seq.request.forked else [seq]
            for s in group:
                rows.append(r)
                seqs.append(s)
        if not seqs:
            return
        # children recomputed after a fork failure land here too, with their own row
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            logits = logits.index_select(0, torch.tensor(rows, device=logits.device))
        contexts: list[RowContext | None] = [None] * len(seqs)
        ended, failed = [], []
        for i, s in enumerate(seqs):
            p = s.request.params
            try:
                banned = self._banned(s) if p.min_new_tokens else []
                allowed = s.grammar.allowed_mask() if s.grammar is not None else None
            except Exception as e:  # noqa: BLE001 - this request's grammar only
                self._fail(s, "structured output", e)
                failed.append(i)
                continue
            if allowed is not None and not bool(allowed.any()):
                ended.append(i)  # the grammar is complete and nothing may follow (no stop token to emit)
                continue
            if p.needs_history or banned or allowed is not None:
                contexts[i] = RowContext(prompt=s.request.input_ids if p.repetition_penalty != 1.0 else (),
                                         output=s.output_ids, banned=banned, allowed=allowed)
        if ended or failed:
            for i in ended:
                s = seqs[i]
                self._finish(s, {"type": "stop", "matched": None} if s.grammar.is_completed() else
                             {"type": "abort", "message": "structured output: the grammar allows no next token"})
            gone = set(ended) | set(failed)
            keep = [i for i in range(len(seqs)) if i not in gone]
            if not keep:
                return
            seqs, contexts = [seqs[i] for i in keep], [contexts[i] for i in keep]
            logits = logits.index_select(0, torch.tensor(keep, device=logits.device))
        want_dist = any(s.request.logprobs.top_logprobs_num or s.request.logprobs.token_ids_logprob is not None
                        for s in seqs if s.request.return_logprob)
        drawn = self._sample_rows(seqs, logits, contexts, want_dist)
        for seq, (tok, lp, dist) in zip(seqs, drawn):
            if tok is None:
                continue  # its sampling failed: _sample_rows ended it
            try:
                self._advance(seq, tok, lp, dist)
            except Exception as e:  # noqa: BLE001 - grammar, stop checks: this request only
                self._fail(seq, "processing the sampled token", e)

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor, contexts: list, want_dist: bool) -> list[tuple]:
        """(token, logprob, distribution or None) per row: one batched draw; should it raise, each row
        alone, so a row that cannot be sampled ends only its own request."""
        def draw(rows: list[int]) -> list[tuple]:
            sub = [seqs[i] for i in rows]
            lg = logits if len(rows) == len(seqs) else logits.index_select(
                0, torch.tensor(rows, device=logits.device))
            out = sample(lg, [s.request.params for s in sub], [s.request.seed for s in sub],
                         [s.sample_idx for s in sub], [len(s.output_ids) for s in sub],
                         contexts=[contexts[i] for i in rows], return_logprobs_all=want_dist)
            return [(out[0][j], out[1][j], out[2][j] if want_dist else None) for j in range(len(rows))]

        try:
            return draw(list(range(len(seqs))))
        except Exception:  # noqa: BLE001
            log.exception("batched sampling failed; sampling row by row")
        results: list[tuple] = []
        for i, seq in enumerate(seqs):
            try:
                results.extend(draw([i]))
            except Exception as e:  # noqa: BLE001
                self._fail(seq, "sampling", e)
                results.append((None, None, None))
        return results

    def _advance(self, seq: Sequence, tok: int, lp: float, dist: torch.Tensor | None) -> None:
        if seq.grammar is not None and not seq.grammar.accept(tok):
            self._finish(seq, {"type": "abort", "message": f"structured output: the grammar refused token {tok} "
                                                           f"after {len(seq.output_ids)} tokens"})
            return
        if dist is not None and seq.request.return_logprob:
            self._record_alternatives(seq, dist)
        seq.tokens.append(tok)
        seq.output_ids.append(tok)
        seq.output_logprobs.append(lp)
        self.generated_tokens += 1
        reason = self._check_stop(seq, tok)
        if reason is not None:
            self._finish(seq, reason)
        elif seq.request.listener is not None:
            every = seq.request.params.stream_interval
            if every is None or len(seq.output_ids) % every == 0:
                self._notify(seq, False)

    @staticmethod
    def _record_alternatives(seq: Sequence, dist: torch.Tensor) -> None:
        """Top-k and listed-token log-probs of the distribution the token was drawn from."""
        opts = seq.request.logprobs
        if opts.top_logprobs_num:
            v, i = dist.topk(min(opts.top_logprobs_num, dist.numel()))
            seq.output_top.append(list(zip(v.tolist(), i.tolist())))
        if opts.token_ids_logprob is not None:
            ids = list(opts.token_ids_logprob)
            seq.output_ids_lp.append(dist[torch.tensor(ids, device=dist.device, dtype=torch.long)].tolist() if ids else [])

    def _banned(self, seq: Sequence) -> list[int]:
        p = seq.request.params
        if len(seq.output_ids) >= p.min_new_tokens:
            return []
        out = list(p.stop_token_ids)
        if self.eos is not None and not p.ignore_eos:
            out.append(self.eos)
        return out

    def _check_stop(self, seq: Sequence, tok: int) -> dict | None:
        p = seq.request.params
        n_out = len(seq.output_ids)
        if n_out >= p.min_new_tokens:
            if not p.ignore_eos and tok == self.eos:
                return {"type": "stop", "matched": tok}
            if tok in p.stop_token_ids:
                return {"type": "stop", "matched": tok}
            if p.stop and self.detokenize is not None:
                window = max(len(s) for s in p.stop) + 8
                tail = self.detokenize(seq.output_ids[-window:], p.skip_special_tokens)
                for s in p.stop:
                    if s in tail:
                        return {"type": "stop", "matched": s}
            if p.stop_regex and self.detokenize is not None:
                tail = self.detokenize(seq.output_ids[-_regex_window(p.stop_regex):], p.skip_special_tokens)
                for pattern in p.stop_regex:
                    if re.search(pattern, tail):
                        seq.stop_regex_match = True
                        return {"type": "stop", "matched": pattern}
            if seq.grammar is not None and seq.grammar.is_terminated():
                return {"type": "stop", "matched": None}  # the grammar is complete (no stop token follows)
        if n_out >= p.max_new_tokens:
            return {"type": "length", "length": p.max_new_tokens}
        if len(seq.tokens) >= self.max_model_len:
            return {"type": "length", "length": n_out}
        return None

    def _final_text(self, seq: Sequence) -> str:
        text = self.detokenize(seq.output_ids, seq.request.params.skip_special_tokens)
        reason = seq.finish_reason or {}
        matched = reason.get("matched")
        if isinstance(matched, str) and seq.stop_regex_match:
            m = re.search(matched, text)
            if m is not None:  # trimmed at the match like a stop string; no_stop_trim keeps the match
                text = text[:m.end()] if seq.request.params.no_stop_trim else text[:m.start()]
        elif isinstance(matched, str) and not seq.request.params.no_stop_trim:
            cut = text.find(matched)
            if cut >= 0:
                text = text[:cut]
        return text

    def running_text(self, seq: Sequence) -> str:
        return self.detokenize(seq.output_ids, seq.request.params.skip_special_tokens) if self.detokenize else ""


def _regex_window(patterns: list[str]) -> int:
    """Output tokens to decode when searching stop regexes: enough for the longest possible match
    (each character may be its own token) plus a margin; unbounded patterns read everything."""
    try:
        import re._parser as sre_parse  # Python >= 3.11
    except ImportError:  # pragma: no cover
        import sre_parse  # type: ignore[no-redef]
    widest = 0
    for pattern in patterns:
        hi = sre_parse.parse(pattern).getwidth()[1]
        if hi >= 1 << 16:
            return 1 << 30
        widest = max(widest, hi)
    return widest + 8
