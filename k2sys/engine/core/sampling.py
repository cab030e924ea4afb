"""Batched token sampling: penalties, biases, masks, temperature, top-k, top-p, min-p,
per-request seeds, logprobs.

One row's logits go through (`process_logits`, each step per row):
    repetition_penalty   HF: every token in prompt + output, x * p if x < 0 else x / p
    frequency/presence   OpenAI: x - f * count(output) - p * [count(output) > 0]
    logit_bias           x + bias
    masks                -inf on banned tokens (min_new_tokens) and outside a grammar's allowed set
then are divided by the temperature and filtered by top-k / top-p / min-p.

Reproducibility without per-request generators: the random draw of a row is a counter-based
hash of (seed, sample index, step, token id) turned into Gumbel noise, and the token is
argmax(filtered logits / T + Gumbel), which is an exact sample of softmax(filtered logits / T).
A request's tokens therefore depend only on its seed, its logits, its own tokens and its own
step, never on which other requests share the batch or on the batch order.

Returned logprobs follow SGLang's default: log_softmax(processed logits / T) of the sampled token,
taken before top-k/top-p renormalisation; greedy rows (T = 0) use T = 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from k2sys.engine.core.config import SamplingParams

__all__ = ["RowContext", "process_logits", "sample", "uniform_noise"]

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix on int64 lanes holding values < 2^32 (multipliers < 2^31, so the
    products stay below 2^63 and never wrap)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _M32
    return x ^ (x >> 15)


def uniform_noise(seeds: torch.Tensor, sample_idx: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B] int64 each -> [B, vocab] float64 uniforms in (0, 1), a pure function of the inputs."""
    dev = seeds.device
    key = _mix32(seeds & _M32)
    key = _mix32(key ^ ((seeds >> 32) & _M32))
    key = _mix32(key ^ (sample_idx & _M32))
    key = _mix32(key ^ (steps & _M32))
    idx = (torch.arange(vocab, device=dev, dtype=torch.int64) * 0x9E3779B1) & _M32
    h = _mix32(_mix32(key[:, None] ^ idx[None, :]) ^ key[:, None])
    return (h.double() + 0.5) * (1.0 / 4294967296.0)


def _filter_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Boolean [B, V]: tokens removed by top-k / top-p / min-p (the best token always stays)."""
    B, V = scaled.shape
    sorted_vals, sorted_idx = scaled.sort(dim=-1, descending=True)
    probs = sorted_vals.softmax(-1)
    rank = torch.arange(V, device=scaled.device)[None, :]
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    drop_sorted = rank >= k[:, None]
    # top-p keeps the smallest prefix whose mass reaches p: a token is dropped when the mass
    # before it already reaches p.
    before = probs.cumsum(-1) - probs
    drop_sorted |= before >= top_p[:, None]
    drop_sorted |= probs < (min_p[:, None] * probs[:, :1])
    drop_sorted[:, 0] = False
    return torch.zeros_like(drop_sorted).scatter_(1, sorted_idx, drop_sorted)


@dataclass
class RowContext:
    """What the logit processing of one row reads besides its params."""
    prompt: Sequence[int] = ()
    output: Sequence[int] = ()
    banned: Sequence[int] = ()
    """Token ids that may not be sampled now (min_new_tokens keeps EOS and stop ids out)."""
    allowed: torch.Tensor | None = None
    """Boolean [V] mask of the tokens a grammar allows next (None = no grammar)."""


def _row_needs(p: SamplingParams, c: RowContext | None) -> bool:
    return p.needs_history or bool(p.logit_bias) or (c is not None and (bool(c.banned) or c.allowed is not None))


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   contexts: Sequence[RowContext | None] | None) -> torch.Tensor:
    """Penalties, biases and masks of each row (fp32 in, fp32 out; the input is not modified)."""
    rows = [i for i, p in enumerate(params) if _row_needs(p, contexts[i] if contexts else None)]
    if not rows:
        return logits
    out = logits.clone()
    V, dev = logits.shape[1], logits.device
    for i in rows:
        p, c = params[i], (contexts[i] if contexts else None) or RowContext()
        row = out[i]
        if p.repetition_penalty != 1.0:
            seen = sorted(set(c.prompt).union(c.output))
            if seen:
                ids = torch.tensor(seen, device=dev)
                v = row.index_select(0, ids)
                row.index_copy_(0, ids, torch.where(v < 0, v * p.repetition_penalty, v / p.repetition_penalty))
        if (p.frequency_penalty != 0.0 or p.presence_penalty != 0.0) and len(c.output):
            counts = torch.bincount(torch.tensor(list(c.output), device=dev), minlength=V)[:V].float()
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=dev)
            row.index_add_(0, ids, torch.tensor(list(p.logit_bias.values()), device=dev, dtype=row.dtype))
        if c.banned:
            row[torch.tensor(list(c.banned), device=dev)] = float("-inf")
        if c.allowed is not None:
            row.masked_fill_(~c.allowed.to(dev), float("-inf"))
    return out


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], sample_idx: list[int],
           steps: list[int], banned: list[list[int]] | None = None, *,
           contexts: Sequence[RowContext | None] | None = None, return_logprobs_all: bool = False):
    """logits [B, V] -> (tokens, logprobs) for each row under its own params; with
    return_logprobs_all also the [B, V] log-probabilities the tokens were drawn from (for top-k
    alternatives). `banned` is the older spelling of contexts[i].banned."""
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    if banned is not None and any(banned):
        contexts = [RowContext(banned=b) if contexts is None or contexts[i] is None
                    else RowContext(contexts[i].prompt, contexts[i].output, list(contexts[i].banned) + list(b),
                                    contexts[i].allowed)
                    for i, b in enumerate(banned)]
    logits = process_logits(logits, params, contexts)
    greedy = [p.greedy for p in params]
    temps = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=dev)
    scaled = logits / temps[:, None]
    logprobs_all = scaled.log_softmax(-1)
    tokens = scaled.argmax(-1)
    if not all(greedy):
        rows = torch.tensor([i for i, g in enumerate(greedy) if not g], device=dev)
        sub = scaled.index_select(0, rows)
        ps = [params[i] for i in rows.tolist()]
        if any(p.top_k > 0 or p.top_p < 1 or p.min_p > 0 for p in ps):
            drop = _filter_mask(sub, torch.tensor([p.top_k for p in ps], device=dev),
                                torch.tensor([p.top_p for p in ps], device=dev),
                                torch.tensor([p.min_p for p in ps], device=dev))
            sub = sub.masked_fill(drop, float("-inf"))
        pick = rows.tolist()
        u = uniform_noise(torch.tensor([seeds[i] for i in pick], dtype=torch.int64, device=dev),
                          torch.tensor([sample_idx[i] for i in pick], dtype=torch.int64, device=dev),
                          torch.tensor([steps[i] for i in pick], dtype=torch.int64, device=dev), V)
        gumbel = (-torch.log(-torch.log(u))).float()
        tokens = tokens.index_copy(0, rows, (sub + gumbel).argmax(-1))
    lp = logprobs_all.gather(1, tokens[:, None])[:, 0]
    if return_logprobs_all:
        return tokens.tolist(), lp.tolist(), logprobs_all
    return tokens.tolist(), lp.tolist()
