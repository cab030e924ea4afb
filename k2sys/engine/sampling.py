"""Batched token sampling: temperature, top-k, top-p, min-p, per-request seeds, logprobs.

Reproducibility without per-request generators: the random draw of a row is a counter-based
hash of (seed, sample index, step, token id) turned into Gumbel noise, and the token is
argmax(filtered logits / T + Gumbel), which is an exact sample of softmax(filtered logits / T).
A request's tokens therefore depend only on its seed, its logits and its own step, never on
which other requests share the batch or on the batch order.

Returned logprobs follow SGLang's default: log_softmax(logits / T) of the sampled token, taken
before top-k/top-p renormalisation; greedy rows (T = 0) use T = 1.
"""

from __future__ import annotations

import torch

from k2sys.engine.config import SamplingParams

__all__ = ["sample", "uniform_noise"]

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


def sample(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], sample_idx: list[int],
           steps: list[int], banned: list[list[int]] | None = None) -> tuple[list[int], list[float]]:
    """logits [B, V] -> (tokens, logprobs) for each row under its own params."""
    logits = logits.float()
    B, V = logits.shape
    dev = logits.device
    if banned is not None and any(banned):
        logits = logits.clone()
        for row, toks in enumerate(banned):
            if toks:
                logits[row, torch.tensor(toks, device=dev)] = float("-inf")
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
    return tokens.tolist(), lp.tolist()
