"""Coverage map of the tool library (seed section 3.1's t-SNE figure): where the tools lie in
"function space", coloured by category, marked by source (MCP / synthetic / built-in).

    tool texts -> hashed n-gram TF-IDF (embed.py) -> TruncatedSVD (<= 50 dims) -> t-SNE (2-D)
    -> PNG scatter (matplotlib, Agg) + the coordinates as JSON next to it

With fewer than 8 tools t-SNE is not meaningful; the first two SVD components are drawn instead
(the JSON says which method was used).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .embed import embed_texts
from .library import LibraryTool, write_json_atomic

__all__ = ["coverage_map", "layout_2d"]

_MARKERS = {"mcp": "o", "synthetic": "^", "builtin": "s"}


def layout_2d(texts: Sequence[str], seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates of the texts and the method used ("tsne" or "svd")."""
    n = len(texts)
    if n == 0:
        return np.zeros((0, 2)), "none"
    if n == 1:
        return np.zeros((1, 2)), "none"
    from sklearn.decomposition import TruncatedSVD

    emb = embed_texts(texts)
    k = max(2, min(50, n - 1, emb.shape[1] - 1))
    red = TruncatedSVD(n_components=k, random_state=seed).fit_transform(emb) if n > 2 else emb.toarray()[:, :2]
    if n < 8:
        return np.asarray(red[:, :2], dtype=float), "svd"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine",
              max_iter=max(250, min(1000, 20 * n))).fit_transform(np.asarray(red, dtype=np.float64))
    return np.asarray(xy, dtype=float), "tsne"


def coverage_map(tools: Sequence[LibraryTool], png_path: str | os.PathLike, *, seed: int = 0,
                 title: str = "Tool library coverage (t-SNE of tool descriptions)") -> dict:
    """Draw the map to `png_path` (and `<png>.json` with the points); returns a summary."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    png_path = Path(png_path)
    xy, method = layout_2d([t.text() for t in tools], seed)
    cats = sorted({t.category for t in tools})
    cmap = plt.get_cmap("tab20" if len(cats) > 10 else "tab10")
    colour = {c: cmap(i % cmap.N) for i, c in enumerate(cats)}
    fig, ax = plt.subplots(figsize=(11, 8), dpi=110)
    for src in sorted({t.source for t in tools}):
        for c in cats:
            idx = [i for i, t in enumerate(tools) if t.source == src and t.category == c]
            if idx:
                ax.scatter(xy[idx, 0], xy[idx, 1], s=46 if src == "mcp" else 22, marker=_MARKERS.get(src, "x"),
                           color=colour[c], edgecolors="black" if src == "mcp" else "none", linewidths=0.6,
                           alpha=0.9, label=f"{c} [{src}]")
    ax.set_title(f"{title}\n{len(tools)} tools, {len(cats)} categories; marker = source (o MCP, ^ synthetic, "
                 f"s built-in); layout: {method}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if tools:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False,
                  ncol=1 if len(cats) <= 25 else 2)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)
    points = [{"name": t.name, "source": t.source, "category": t.category, "domain": t.domain,
               "x": round(float(x), 4), "y": round(float(y), 4)} for t, (x, y) in zip(tools, xy)]
    summary = {"png": str(png_path), "method": method, "tools": len(tools), "categories": len(cats),
               "by_source": {s: sum(t.source == s for t in tools) for s in sorted({t.source for t in tools})}}
    if len(tools) >= 2:
        # Spread: mean distance to the centroid per source, a rough number for "coverage grew".
        for s in summary["by_source"]:
            pts = xy[[i for i, t in enumerate(tools) if t.source == s]]
            summary.setdefault("spread", {})[s] = round(float(np.linalg.norm(pts - xy.mean(0), axis=1).mean()), 3)
    write_json_atomic(png_path.with_suffix(".json"), {**summary, "points": points})
    return summary
