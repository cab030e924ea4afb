"""Shared benchmark plumbing: the bound rule, result rows, environment record, JSON output, tables.

Every benchmark writes {"results": [row, ...], "env": {...}} where a row is
  {"name", "value", "unit", "baseline", "ratio", "target", "kind", ...}
`ratio` is oriented so that higher is better; `target` is a number only where an issue sets one.

The bound rule (docs/benchmarks.md):
  * A bound is measured in the same run, on the same buffers, with the same thread count as the
    system under test. For copies that is `CopyBound`: the same source/destination bytes copied
    by N threads taking pieces from one work queue; the bound at N threads is, per round, the
    fastest of the plain copy implementations (libc memcpy, torch copy_, the k2sys streaming
    copy), so a system that beats it beats every plain copy tried. Rows are reported at 1 thread and at all cores; a bound
    with fewer threads than the system is labelled "reference" (the system may beat it) and
    carries no target.
  * System and bound (or peer) run interleaved in rounds (`interleaved`), >= MIN_REPS rounds;
    the ratio is the median of the per-round ratios, with its spread (min/max/quartiles).
  * Every row says what it was measured against ("bound"), with how many threads ("threads")
    and rounds ("reps"). Diagnostics ("kind": "diagnostic") and projections ("kind":
    "projection") carry no ratio and no target.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import platform
import queue
import statistics
import tempfile
import threading
import time
from typing import Callable, Sequence

import torch

MIN_REPS = 5
# bound: system vs a bound measured in this run; peer: vs another implementation in this run;
# reference: vs a bound with fewer threads than the system (not a bound: the system may beat it);
# count: a counted quantity vs its minimum; diagnostic / projection: no ratio, no target.
KINDS = ("bound", "peer", "reference", "count", "diagnostic", "projection")
RATIO_KINDS = ("bound", "peer", "reference", "count")


def all_cores() -> int:
    """CPUs this process may run on (affinity), the thread count of "all cores"."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def thread_counts(system_threads: int | None = None) -> list[int]:
    """The bound's thread counts: 1 and all cores (and the system's own count if it differs)."""
    ts = {1, all_cores()}
    if system_threads:
        ts.add(int(system_threads))
    return sorted(ts)


# ------------------------------------------------------------------ statistics
def summarize(xs: Sequence[float]) -> dict:
    """Median and spread (min, max, quartiles) of a sample."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("summarize: empty sample")
    if len(xs) > 1:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "q1": q1, "q3": q3, "n": len(xs)}


class Timings:
    """Seconds per round of each named function, and the order they actually ran in."""

    def __init__(self, names: Sequence[str]):
        self.times: dict[str, list[float]] = {n: [] for n in names}
        self.order: list[tuple[int, str]] = []  # (round, name) in execution order

    @property
    def reps(self) -> int:
        return min((len(v) for v in self.times.values()), default=0)

    def add(self, rnd: int, name: str, seconds: float) -> None:
        self.times[name].append(seconds)
        self.order.append((rnd, name))

    def __getitem__(self, name: str) -> list[float]:
        return self.times[name]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def best(self, names: Sequence[str]) -> list[float]:
        """Per round, the fastest of `names` (e.g. the copy implementations of one bound)."""
        return [min(ts) for ts in zip(*(self.times[n] for n in names))]


def interleaved(fns: dict[str, Callable[[], object]], reps: int = MIN_REPS, warmup: int = 1,
                sync: Callable[[], object] | None = None, rotate: bool = True,
                before: dict[str, Callable[[], object]] | None = None,
                after: dict[str, Callable[[], object]] | None = None) -> Timings:
    """Time every function once per round for `reps` rounds (after `warmup` untimed rounds).

    rotate: round r starts at function r % k, so no function always runs first or always
    follows the same one (off for stateful sequences that must run in order).
    before / after: untimed set-up / tear-down per function (e.g. flush a cache, commit a session),
    run just before / after it each time.
    sync: called after each function inside the timed region (e.g. torch.cuda.synchronize).
    """
    if reps < 1:
        raise ValueError(f"interleaved: reps must be >= 1, got {reps}")
    names = list(fns)
    before, after = before or {}, after or {}
    for _ in range(warmup):
        for n in names:
            if n in before:
                before[n]()
            fns[n]()
            if sync:
                sync()
            if n in after:
                after[n]()
    tm = Timings(names)
    for r in range(reps):
        k = r % len(names) if rotate else 0
        for n in names[k:] + names[:k]:
            if n in before:
                before[n]()
            t0 = time.perf_counter()
            fns[n]()
            if sync:
                sync()
            tm.add(r, n, time.perf_counter() - t0)
            if n in after:
                after[n]()
    return tm


# ------------------------------------------------------------------ threaded copy bound
class _Workers:
    """N persistent threads, each running torch with one intra-op thread (so N threads is N)."""

    def __init__(self, n: int):
        self.n = n
        self._qs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        keep = torch.get_num_threads()
        ready = threading.Barrier(n + 1)
        self._threads = [threading.Thread(target=self._loop, args=(q, ready), daemon=True) for q in self._qs]
        for t in self._threads:
            t.start()
        ready.wait()
        torch.set_num_threads(keep)  # set_num_threads(1) in a worker changes the default of new threads

    def _loop(self, q: queue.SimpleQueue, ready: threading.Barrier) -> None:
        torch.set_num_threads(1)
        # torch initialises a thread's OpenMP thread count lazily, at its first get, from the process
        # default, which the caller restores once every worker is ready: read it now, while it is 1
        torch.get_num_threads()
        ready.wait()
        while True:
            job = q.get()
            if job is None:
                return
            try:
                job()
                self._done.put(None)
            except BaseException as e:  # surfaced in run()
                self._done.put(e)

    def run(self, jobs: Sequence[Callable[[], object]]) -> None:
        if len(jobs) > self.n:
            raise ValueError(f"_Workers.run: {len(jobs)} jobs for {self.n} threads")
        for q, job in zip(self._qs, jobs):
            q.put(job)
        errs = [self._done.get() for _ in jobs]
        for e in errs:
            if e is not None:
                raise e

    def close(self) -> None:
        for q in self._qs:
            q.put(None)
        for t in self._threads:
            t.join()


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("CopyBound: tensors must be contiguous")
    return t.reshape(-1).view(torch.uint8)


def split_stream(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], parts: int,
                 nbytes: int | None = None) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """The byte stream of `srcs` laid onto that of `dsts`, cut into `parts` contiguous ranges of
    (almost) equal size; each range is a list of (dst slice, src slice) uint8 pieces."""
    d = [_byte_view(t) for t in dsts]
    s = [_byte_view(t) for t in srcs]
    total = min(sum(x.numel() for x in d), sum(x.numel() for x in s))
    total = total if nbytes is None else min(total, nbytes)
    bounds = [total * i // parts for i in range(parts + 1)]
    out: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(parts)]

    def segs(views):  # (start, end, view) in stream coordinates
        pos, res = 0, []
        for v in views:
            res.append((pos, pos + v.numel(), v))
            pos += v.numel()
        return res

    ds, ss = segs(d), segs(s)
    for p in range(parts):
        lo, hi = bounds[p], bounds[p + 1]
        pos = lo
        while pos < hi:
            da, db, dv = next(x for x in ds if x[0] <= pos < x[1])
            sa, sb, sv = next(x for x in ss if x[0] <= pos < x[1])
            end = min(hi, db, sb)
            out[p].append((dv[pos - da:end - da], sv[pos - sa:end - sa]))
            pos = end
    return out


def split_pieces(dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], piece_bytes: int,
                 nbytes: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The byte stream of `srcs` laid onto that of `dsts`, cut into pieces of at most `piece_bytes`
    (and at every buffer boundary): the work items of a work-queue copy."""
    if piece_bytes < 1:
        raise ValueError(f"split_pieces: piece_bytes must be >= 1, got {piece_bytes}")
    d = [_byte_view(t) for t in dsts]
    s = [_byte_view(t) for t in srcs]
    total = min(sum(x.numel() for x in d), sum(x.numel() for x in s))
    total = total if nbytes is None else min(total, nbytes)
    whole = split_stream(dsts, srcs, 1, total)[0] if total else []
    out = []
    for dv, sv in whole:
        for lo in range(0, dv.numel(), piece_bytes):
            out.append((dv[lo:lo + piece_bytes], sv[lo:lo + piece_bytes]))
    return out


class CopyBound:
    """The plain-copy bound of a copy-like system: copy the same bytes (same source and
    destination buffers) with N threads that take pieces from one shared work queue (so a thread
    the shared machine slows down does not hold the others back: the system's own pool balances
    its load too, and a static split would be a bound it can beat).

    Implementations: "memcpy" (libc memmove through ctypes, which releases the GIL), "torch"
    (tensor copy_ of each piece, one intra-op thread per worker) and, when the k2sys C++ extension
    is built, "stream": the same non-temporal copy kernel the k2sys host copies use
    (csrc/stream_copy.h, one C++ thread per worker), and "pool": all the pieces in one
    batched_copy_ptr call over N threads of the k2sys C++ pool (the same kernel without the Python
    work queue's per-piece overhead; a plain copy, none of any system's pipelining or bookkeeping). glibc streams only copies above ~3/4 of the
    last-level cache, so without "stream" the bound would be one the system beats on MB-sized
    pieces. `fns()` gives one callable per (implementation, thread count) to put in `interleaved`;
    `seconds(tm, threads)` is the bound per round: the fastest implementation at that thread count.
    """

    IMPLS = ("memcpy", "torch", "stream", "pool")
    PIECE_MIN, PIECE_MAX = 256 << 10, 8 << 20

    def __init__(self, dst, src, threads: Sequence[int] | None = None, impls: Sequence[str] | None = None,
                 nbytes: int | None = None, label: str = "copy",
                 where: str = "the system's own source and destination buffers", piece_bytes: int | None = None):
        dsts = list(dst) if isinstance(dst, (list, tuple)) else [dst]
        srcs = list(src) if isinstance(src, (list, tuple)) else [src]
        for t in dsts + srcs:
            if t.device.type != "cpu":
                raise ValueError("CopyBound: CPU tensors only (GPU benchmarks time cudaMemcpy directly)")
        impls = list(impls) if impls is not None else [i for i in self.IMPLS if i in ("memcpy", "torch") or _has_cpp()]
        bad = [i for i in impls if i not in self.IMPLS]
        if bad:
            raise ValueError(f"CopyBound: unknown implementations {bad}; choose from {self.IMPLS}")
        if {"stream", "pool"} & set(impls) and not _has_cpp():
            raise ValueError("CopyBound: impls 'stream' and 'pool' need the k2sys C++ extension (pip install -e .)")
        self.threads = sorted(set(threads or thread_counts()))
        self.impls = impls
        self.label = label
        self.where = where
        total = min(sum(_byte_view(t).numel() for t in dsts), sum(_byte_view(t).numel() for t in srcs))
        total = total if nbytes is None else min(total, nbytes)
        if piece_bytes is None:  # a few pieces per thread, but never tiny (per-piece overhead) or huge
            piece_bytes = min(self.PIECE_MAX, max(self.PIECE_MIN, total // (4 * max(self.threads))))
        self.piece_bytes = piece_bytes
        self._pieces = split_pieces(dsts, srcs, piece_bytes, total)
        self.nbytes = sum(dv.numel() for dv, _ in self._pieces)
        self._workers = _Workers(max(self.threads))

    def name(self, impl: str, threads: int) -> str:
        return f"{self.label}:{impl}:x{threads}"

    def names(self, threads: int) -> list[str]:
        return [self.name(i, threads) for i in self.impls]

    def _copy_one(self, impl: str) -> Callable[[torch.Tensor, torch.Tensor], None]:
        # pointers are read at call time: a storage resized in between moves its data
        if impl == "memcpy":
            return lambda d, s: ctypes.memmove(d.data_ptr(), s.data_ptr(), d.numel())
        if impl == "stream":
            cpp = _cpp()
            return lambda d, s: cpp.copy_ptr(d.data_ptr(), s.data_ptr(), d.numel(), 1, 0)
        return lambda d, s: d.copy_(s)

    def copier(self, impl: str, threads: int) -> Callable[[], None]:
        if impl == "pool":
            cpp, pieces = _cpp(), self._pieces

            def run_pool() -> None:  # addresses read at call time, as the other implementations do
                cpp.batched_copy_ptr([d.data_ptr() for d, _ in pieces], [s.data_ptr() for _, s in pieces],
                                     [d.numel() for d, _ in pieces], threads, 0)
            return run_pool
        pieces, one = self._pieces, self._copy_one(impl)

        def run() -> None:
            take = itertools.count()  # next() on a count is atomic under the GIL: one shared queue

            def job() -> None:
                while (i := next(take)) < len(pieces):
                    one(*pieces[i])
            self._workers.run([job] * threads)
        return run

    def fns(self) -> dict[str, Callable[[], None]]:
        return {self.name(i, n): self.copier(i, n) for n in self.threads for i in self.impls}

    def seconds(self, tm: Timings, threads: int) -> list[float]:
        return tm.best(self.names(threads))

    def definition(self, threads: int) -> str:
        return (f"plain copy of the same {self.nbytes / 1e6:.1f} MB ({self.where}) on {threads} thread(s) "
                f"taking {self.piece_bytes / 2**20:.2f} MiB pieces from one work queue; per round the "
                f"fastest of {'/'.join(self.impls)}")

    def close(self) -> None:
        self._workers.close()

    def __enter__(self) -> "CopyBound":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _has_cpp() -> bool:
    from k2sys import ext
    return bool(ext.HAS_CPP)


def _cpp():
    from k2sys import ext
    return ext.require_cpp()


# ------------------------------------------------------------------ rows
def result(name: str, value: float, unit: str, baseline: float | None, target: float | None = None,
           ratio: float | None = None, **extra) -> dict:
    """One row; ratio defaults to value / baseline."""
    if ratio is None and baseline:
        ratio = value / baseline
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "target": target,
            **extra}


def paired_row(name: str, system_s: Sequence[float], baseline_s: Sequence[float], *, bound: str, threads,
               system_threads, kind: str = "bound", target: float | None = None, work: float | None = None,
               unit: str | None = None, scale: float = 1.0, digits: int = 4, **extra) -> dict:
    """A row from paired per-round seconds of the system and of its bound/peer (same rounds).

    value/baseline: `work` per second / `scale` (e.g. bytes, 1e9 -> GB/s) of the medians, or the
    median seconds when `work` is None; ratio: median over rounds of baseline_s / system_s
    (higher = better), spread: its min/max/quartiles.
    """
    if kind not in RATIO_KINDS:
        raise ValueError(f"paired_row: kind {kind!r} has no ratio; use diagnostic() or projection_row()")
    if len(system_s) != len(baseline_s) or not system_s:
        raise ValueError(f"paired_row {name}: {len(system_s)} system rounds vs {len(baseline_s)} baseline rounds")
    if kind == "reference":
        target = None
    ratios = [b / s for s, b in zip(system_s, baseline_s)]
    ms, mb = statistics.median(system_s), statistics.median(baseline_s)
    if work is None:
        value, base, unit = ms, mb, unit or "s"
    else:
        value, base = work / ms / scale, work / mb / scale
    sp = summarize(ratios)
    return result(name, round(value, digits), unit, round(base, digits), target=target, ratio=round(sp["median"], 4),
                  kind=kind, bound=bound, threads=threads, system_threads=system_threads, reps=len(ratios),
                  spread={k: round(sp[k], 4) for k in ("min", "q1", "q3", "max")},
                  seconds={"system": summarize(system_s), "baseline": summarize(baseline_s)}, **extra)


def copy_bound_rows(name: str, system_s: Sequence[float], cb: CopyBound, tm: Timings, *, system_threads: int,
                    target: float | None = None, work: float | None = None, unit: str = "GB/s",
                    scale: float = 1e9, factor: float = 1.0, what: str = "", **extra) -> list[dict]:
    """The system vs the copy bound at each of the bound's thread counts (1 and all cores).

    factor: bound time = factor x copy time (e.g. 2 where the design must copy twice).
    A bound with fewer threads than the system is a "reference" row without a target.
    """
    rows = []
    work = cb.nbytes if work is None else work
    for n in cb.threads:
        kind = "bound" if n >= system_threads else "reference"
        desc = cb.definition(n) if factor == 1 else f"{factor:g} x ({cb.definition(n)})"
        rows.append(paired_row(f"{name}_vs_copy_x{n}", system_s, [factor * t for t in cb.seconds(tm, n)],
                               bound=desc + (f"; {what}" if what else ""), threads=n, system_threads=system_threads,
                               kind=kind, target=target if kind == "bound" else None, work=work, unit=unit,
                               scale=scale, **extra))
    return rows


def diagnostic(name: str, value, unit: str, what: str, **extra) -> dict:
    """A labelled diagnostic: a figure to read, not a ratio against a bound, never a target."""
    extra.pop("target", None)
    extra.pop("ratio", None)
    return {"name": name, "value": value, "unit": unit, "baseline": None, "ratio": None, "target": None,
            "kind": "diagnostic", "what": what, **extra}


def projection_row(name: str, value, unit: str, what: str, **extra) -> dict:
    """A projection to hardware not in this run: priced from stated figures, no ratio, no target."""
    extra.pop("target", None)
    extra.pop("ratio", None)
    return {"name": name, "value": value, "unit": unit, "baseline": None, "ratio": None, "target": None,
            "kind": "projection", "what": what, **extra}


def validate_rows(rows: list[dict], min_reps: int = MIN_REPS) -> list[str]:
    """Raise on rows that break the rule; return warnings (e.g. fewer than MIN_REPS rounds)."""
    warnings = []
    for r in rows:
        kind = r.get("kind")
        if kind not in KINDS:
            raise ValueError(f"row {r.get('name')}: kind {kind!r} not one of {KINDS}")
        if kind in ("diagnostic", "projection"):
            if r.get("target") is not None or r.get("ratio") is not None:
                raise ValueError(f"row {r['name']}: a {kind} carries no ratio and no target")
            continue
        for key in ("bound", "threads", "reps"):
            if r.get(key) is None:
                raise ValueError(f"row {r['name']}: a {kind} row must say its {key}")
        if kind == "reference" and r.get("target") is not None:
            raise ValueError(f"row {r['name']}: a reference (not a bound) carries no target")
        if kind != "count" and r["reps"] < min_reps and not r.get("deterministic"):
            warnings.append(f"{r['name']}: {r['reps']} rounds (< {min_reps})")
    return warnings


# ------------------------------------------------------------------ env, output, tables
def env_info(**extra) -> dict:
    """Machine and library versions (+ the benchmark's own settings in `extra`)."""
    from k2sys import ext

    info = {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "cpus_usable": all_cores(), "torch_threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "extensions": ext.summary(), "bound_rule": "docs/benchmarks.md", **_git_state()}
    info.update(extra)
    return info


def _git_state() -> dict:
    """The commit the benchmark ran from and whether its code had uncommitted changes (recorded results and
    .md files aside; None outside git)."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        # Code only: recorded results and docs edited while a regeneration runs do not change what ran.
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout.splitlines()
        dirty = [ln for ln in status if not (ln[3:].startswith("benchmarks/results/") or ln[3:].endswith(".md"))]
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(dirty) if commit else None}


def add_common_args(ap) -> None:
    ap.add_argument("--note", default=None,
                    help="free text recorded in env['note'] (e.g. 'machine shared with other jobs')")


def write_json(path: str, body: dict) -> None:
    """Write atomically (temp file in the same folder, then rename)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".bench.")
    os.fchmod(fd, 0o644)  # mkstemp makes it private; results are for everyone
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, indent=2, default=float)
        f.write("\n")
    os.replace(tmp, path)


def write_results(path: str | None, rows: list[dict], env: dict) -> None:
    """Check the rows against the bound rule, then write them (when a path is given)."""
    warn = validate_rows(rows)
    if warn:
        env = {**env, "rule_warnings": warn}
        for w in warn:
            print(f"warning: {w}")
    if path:
        write_json(path, {"results": rows, "env": env})


def print_results(results: list[dict], title: str | None = None) -> None:
    """The rows as a table: value, baseline, ratio [spread], target (ok / MISS), kind, threads x reps."""
    t = Table(["name", "value", "unit", "baseline", "ratio [min..max]", "target", "kind", "thr x reps"])
    for r in results:
        tgt = ""
        if r.get("target") is not None:
            tgt = f"{r['target']:.3g} {'ok' if (r['ratio'] or 0) >= r['target'] else 'MISS'}"
        ratio = _fmt(r["ratio"])
        sp = r.get("spread")
        if sp and r["ratio"] is not None:
            ratio += f" [{sp['min']:.3g}..{sp['max']:.3g}]"
        tr = "" if r.get("threads") is None else f"{r['threads']}x{r.get('reps', '-')}"
        t.add([r["name"], _fmt(r["value"]), r["unit"], _fmt(r["baseline"]), ratio, tgt, r.get("kind", "-"), tr])
    if title:
        print(title)
    print(t.render())


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


class Table:
    def __init__(self, header: list[str]):
        self.rows = [header]

    def add(self, row: list[str]) -> None:
        self.rows.append([str(c) for c in row])

    def render(self) -> str:
        widths = [max(len(r[i]) for r in self.rows) for i in range(len(self.rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in self.rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)
