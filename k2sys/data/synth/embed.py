"""A cheap local text embedding for tool descriptions: hashed character n-gram TF-IDF.

    text -> lowercase, words joined by single spaces, padded -> character n-grams (n = 3..5)
         -> crc32 hash into `dim` buckets (stable across processes, unlike hash())
         -> sublinear tf (1 + log count) x idf over the batch -> L2-normalised sparse rows

Good enough to find near-duplicate tools (the same tool renamed or reworded) and to lay tools out
on a map; no model download. Cosine similarity is a sparse dot product.
"""

from __future__ import annotations

import math
import re
import zlib
from typing import Sequence

import numpy as np

__all__ = ["embed_texts", "cosine_matrix", "greedy_dedup", "tool_text"]

_WS = re.compile(r"[\s_\-./]+")


def tool_text(name: str, description: str, parameters: dict | None = None) -> str:
    """What a tool is about: its name as words, its description and its argument names."""
    props = list((parameters or {}).get("properties", {}) or {})
    return f"{name} {description} {' '.join(props)}"


def _ngrams(text: str, ns: Sequence[int]) -> dict[int, int]:
    s = " " + _WS.sub(" ", text.casefold()).strip() + " "
    out: dict[int, int] = {}
    for n in ns:
        for i in range(max(0, len(s) - n + 1)):
            h = zlib.crc32(s[i:i + n].encode("utf-8"))
            out[h] = out.get(h, 0) + 1
    return out


def embed_texts(texts: Sequence[str], *, dim: int = 1 << 15, ns: Sequence[int] = (3, 4, 5), idf: bool = True):
    """Sparse (len(texts), dim) float32 matrix of L2-normalised hashed n-gram TF-IDF rows."""
    from scipy import sparse

    rows, cols, vals = [], [], []
    df = np.zeros(dim, dtype=np.float64)
    per_doc: list[dict[int, float]] = []
    for text in texts:
        buckets: dict[int, float] = {}
        for h, c in _ngrams(text, ns).items():
            b = h % dim
            buckets[b] = buckets.get(b, 0.0) + c
        per_doc.append(buckets)
        for b in buckets:
            df[b] += 1
    n = len(texts)
    weights = np.log((1.0 + n) / (1.0 + df)) + 1.0 if idf else np.ones(dim)
    for i, buckets in enumerate(per_doc):
        if not buckets:
            continue
        idx = np.fromiter(buckets, dtype=np.int64, count=len(buckets))
        tf = np.array([1.0 + math.log(buckets[b]) for b in idx])
        v = tf * weights[idx]
        v /= np.linalg.norm(v) or 1.0
        rows.extend([i] * len(idx))
        cols.extend(idx.tolist())
        vals.extend(v.tolist())
    return sparse.csr_matrix((np.asarray(vals, dtype=np.float32), (rows, cols)), shape=(n, dim))


def cosine_matrix(a, b) -> np.ndarray:
    """Dense cosine similarities between the rows of two embedding matrices (rows are unit length)."""
    return np.asarray((a @ b.T).todense(), dtype=np.float32)


def greedy_dedup(emb, threshold: float, keep_first: int = 0, block: int = 512) -> list[tuple[int, int, float]]:
    """Drop rows too similar to an earlier kept row, in order.

    Rows [0, keep_first) are always kept (an existing library). Returns, for each dropped row,
    (row, the kept row it duplicates, similarity); every other row is kept.
    """
    n = emb.shape[0]
    kept = np.zeros(n, dtype=bool)
    kept[:keep_first] = True
    dropped: list[tuple[int, int, float]] = []
    for start in range(keep_first, n, block):
        stop = min(n, start + block)
        sims = cosine_matrix(emb[start:stop], emb[:stop])   # (block, stop)
        for r in range(stop - start):
            i = start + r
            s = np.where(kept[:i], sims[r, :i], -1.0)
            j = int(np.argmax(s)) if i else -1
            if j >= 0 and s[j] >= threshold:
                dropped.append((i, j, float(s[j])))
            else:
                kept[i] = True
    return dropped
