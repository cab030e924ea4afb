"""`k2sys kernels ...`: GPU-readiness checks of the project's kernels that run on a CPU machine.

  k2sys kernels compile --arch 90 --json OUT   compile every Triton kernel x config x dtype for sm_90
                                               (k2sys_triton.compile_check); exit 1 if any entry fails
  k2sys kernels nvcc --arch 80 90 --json OUT   build csrc/cuda with nvcc -Xptxas -v; registers/spills
                                               per kernel (k2sys.kernels.nvcc_report); exit 1 on spills

The Triton kernels must be compiled, not interpreted: when TRITON_INTERPRET=1 was set before
k2sys_triton was imported (e.g. by scripts/test.sh), `compile` re-runs itself in a subprocess
without it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


class KernelsCLIError(ValueError):
    """A `k2sys kernels` argument cannot be used; the message names it and the fix."""


def _check_json_path(path: str | None) -> None:
    """Refuse an unusable --json before minutes of compiling, not after."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise KernelsCLIError(f"--json {path}: is a directory; give a file path, e.g. {p / 'report.json'}")
    parent = p.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if not parent.is_dir():
        raise KernelsCLIError(f"--json {path}: {parent} is a file, so the report cannot be written there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KernelsCLIError(f"--json {path}: {parent} is not writable; choose another path")


def _write_json(path: str, obj: dict) -> None:
    from k2sys.models.hf_io import write_json_atomic

    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(p, obj)
    except OSError as e:
        raise KernelsCLIError(f"--json {path}: cannot write the report ({e.strerror or e})") from None


def _print_compile(report: dict) -> None:
    s = report["summary"]
    shared = s["max_shared_bytes"]
    print(f"# k2sys kernels compile: sm_{report['arch']}, triton {report['triton']}, {report['cases']} cases -> "
          f"{s['entries']} distinct compiles in {report['wall_seconds']} s ({report['workers']} workers)")
    print(f"  ok {s['ok']}, failed {s['failed']}, max shared {shared} B "
          f"(limit {report['shared_limit_bytes']} B), max registers {s['max_registers']}, spilling {s['spilling']}")
    for name, n in sorted(s["per_kernel"].items()):
        print(f"  {n:4d}  {name}")
    for t in report["tables"]:
        print(f"  table {t['table']}: " + ("compiled" if t["compiled"] else f"skipped ({t['skipped']})"))
    for line in s["failures"]:
        print(f"  FAILED {line}")


def _cmd_compile(args: argparse.Namespace, argv: list[str]) -> int:
    import k2sys_triton

    if not k2sys_triton.HAS_TRITON:
        print("k2sys kernels compile: triton is not installed (`pip install k2sys[kernels]`)", file=sys.stderr)
        return 2
    if k2sys_triton.KERNELS_INTERPRETED:  # kernels were built as interpreter functions: re-run compiled
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        return subprocess.call([sys.executable, "-m", "k2sys.kernels.cli", *argv], env=env)
    from k2sys_triton import compile_check as cc

    workers = args.jobs or cc.default_workers()
    progress = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        report = cc.run_check(args.arch, roles=args.roles or cc.ROLES, shapes=args.shapes, dtypes=args.dtypes,
                              config_dir=args.config_dir, heuristic=not args.no_heuristic, workers=workers,
                              progress=progress)
    except ValueError as e:
        print(f"k2sys kernels compile: {e}", file=sys.stderr)
        return 2
    if args.json:
        _write_json(args.json, report)
    _print_compile(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report["summary"]["failed"] == 0 else 1


def _cmd_nvcc(args: argparse.Namespace, argv: list[str]) -> int:
    from k2sys.kernels import nvcc_report

    try:
        report = nvcc_report.run_report(args.arch, sources=args.sources, nvcc=args.nvcc)
    except (FileNotFoundError, ValueError) as e:
        print(f"k2sys kernels nvcc: {e}", file=sys.stderr)
        return 2
    if args.json:
        _write_json(args.json, report)
    nvcc_report.print_report(report)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if report["summary"]["failed"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2sys kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("compile", help="compile every Triton kernel x config x dtype for a GPU arch (no GPU needed)")
    c.add_argument("--arch", type=int, required=True, help="compute capability: 90 (H100/H200) or 80 (A100)")
    c.add_argument("--json", help="write the report here")
    c.add_argument("--roles", nargs="+", help="subset of kernel roles (default: all; see k2sys_triton.compile_check)")
    c.add_argument("--shapes", nargs="+", help="subset of shapes (kimi-k2, kimi-k2-ep8, kimi-k2-tp8, k2-small)")
    c.add_argument("--dtypes", nargs="+", help="subset of dtypes (fp32, fp16, bf16, fp8_w8a16_block128)")
    c.add_argument("--config-dir", type=Path, help="tuned-table folder (default: the package's configs/)")
    c.add_argument("--no-heuristic", action="store_true", help="only the tuned tables' configs")
    c.add_argument("--jobs", type=int, default=0, help="parallel compile processes (default: usable CPUs)")
    c.add_argument("--quiet", action="store_true", help="no per-compile progress on stderr")
    c.set_defaults(fn=_cmd_compile)
    n = sub.add_parser("nvcc", help="nvcc -Xptxas -v over csrc/cuda: registers and spills per kernel")
    n.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    n.add_argument("--json", help="write the report here")
    n.add_argument("--sources", nargs="+", type=Path, help="the .cu files (default: csrc/cuda/*.cu)")
    n.add_argument("--nvcc", help="nvcc binary (default: $CUDACXX, /usr/local/cuda/bin/nvcc, PATH)")
    n.set_defaults(fn=_cmd_nvcc)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "jobs", 0) < 0:
        parser.error(f"--jobs: must be >= 0 (0 = every usable CPU), got {args.jobs}")
    t0 = time.perf_counter()
    try:
        _check_json_path(args.json)
        rc = args.fn(args, argv)
    except KernelsCLIError as e:
        print(f"k2sys kernels {args.action}: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "quiet", False):
        print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
