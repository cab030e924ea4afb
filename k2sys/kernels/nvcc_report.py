"""Registers and spills of the CUDA extension's kernels (csrc/cuda), from nvcc -Xptxas -v.

Each .cu file is compiled to an object in a temp folder with the flags the CMake build uses
(C++17, -O3 -DNDEBUG, -fPIC, csrc/ on the include path) for every requested architecture, with
`-Xptxas -v`; ptxas' report gives per kernel and architecture: registers, spill stores/loads,
stack frame and static shared memory. An entry fails when the kernel spills or the file does not
compile. Nothing is linked or installed: the normal build (CMakeLists.txt, where
-DK2SYS_PTXAS_VERBOSE=ON prints the same report during `pip install`) is untouched.

  k2sys kernels nvcc --arch 80 90 --json OUT     (or scripts/nvcc_report.sh)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["find_nvcc", "default_sources", "parse_ptxas", "run_report", "print_report", "NVCC_FLAGS"]

ROOT = Path(__file__).resolve().parents[2]
NVCC_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "-Xcompiler=-fPIC"]
_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def find_nvcc(explicit: str | None = None) -> str:
    """nvcc from the argument, $CUDACXX, /usr/local/cuda/bin/nvcc or PATH; FileNotFoundError otherwise."""
    for cand in (explicit, os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError("nvcc not found: install the CUDA toolkit, or pass --nvcc / set CUDACXX")


def default_sources() -> list[Path]:
    return sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def parse_ptxas(log: str) -> list[dict]:
    """[{mangled, arch, registers, spill_stores, spill_loads, stack_bytes, shared_bytes}] per entry function."""
    entries: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = {"mangled": m[1], "arch": m[2], "registers": None, "spill_stores": None, "spill_loads": None,
                       "stack_bytes": None, "shared_bytes": 0}
            entries.append(current)
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current["stack_bytes"], current["spill_stores"], current["spill_loads"] = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m[1])
            if m[2]:
                current["shared_bytes"] = int(m[2])
    return entries


def run_report(archs: list[int], sources: list[Path] | None = None, nvcc: str | None = None) -> dict:
    """Compile each source for every arch with -Xptxas -v; the report {arch, kernels, summary, ...}."""
    if not archs or any(a < 50 for a in archs):
        raise ValueError(f"--arch: compute capabilities like 80 90, got {archs}")
    nvcc = find_nvcc(nvcc)
    sources = [Path(s) for s in (sources or default_sources())]
    missing = [str(s) for s in sources if not s.is_file()]
    if missing or not sources:
        raise FileNotFoundError(f"CUDA sources not found: {missing or 'csrc/cuda/*.cu is empty'}")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    t0 = time.perf_counter()
    kernels: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="k2sys-nvcc-") as tmp:
        for src in sources:
            cmd = [nvcc, "-c", *NVCC_FLAGS, f"-I{ROOT / 'csrc'}", *gencode, "-Xptxas", "-v", str(src),
                   "-o", str(Path(tmp) / (src.stem + ".o"))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            rel = os.path.relpath(src, ROOT)
            if proc.returncode != 0:
                kernels.append({"name": rel, "file": rel, "arch": None, "ok": False, "registers": None, "spills": None,
                                "error": f"nvcc exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"})
                continue
            found = parse_ptxas(proc.stderr + proc.stdout)
            names = _demangle([e["mangled"] for e in found])
            for e in found:
                spills = (e["spill_stores"] or 0) + (e["spill_loads"] or 0)
                problems = []
                if e["registers"] is None:
                    problems.append("ptxas reported no register count")
                if spills:
                    problems.append(f"spills {e['spill_stores']} B stores + {e['spill_loads']} B loads")
                kernels.append({"name": names[e["mangled"]], "mangled": e["mangled"], "file": rel, "arch": e["arch"],
                                "registers": e["registers"], "spills": spills, "stack_bytes": e["stack_bytes"],
                                "shared_bytes": e["shared_bytes"], "ok": not problems,
                                "error": "; ".join(problems) or None})
    failed = [k for k in kernels if not k["ok"]]
    return {
        "arch": list(archs),
        "nvcc": nvcc,
        "nvcc_version": version[-1] if version else "",
        "flags": NVCC_FLAGS + gencode + ["-Xptxas", "-v"],
        "kernels": kernels,
        "summary": {
            "entries": len(kernels), "failed": len(failed),
            "spilling": sum(1 for k in kernels if k.get("spills")),
            "max_registers": max((k["registers"] for k in kernels if k.get("registers") is not None), default=None),
            "failures": [f"{k['name']} [{k['arch']}]: {k['error']}" for k in failed],
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }


def print_report(report: dict) -> None:
    s = report["summary"]
    print(f"# nvcc -Xptxas -v, archs {report['arch']} ({report['nvcc_version']}): {s['entries']} kernel builds, "
          f"{s['failed']} failed, {s['spilling']} spilling, max registers {s['max_registers']}")
    for k in report["kernels"]:
        status = "ok" if k["ok"] else f"FAILED ({k['error']})"
        print(f"  {k['arch'] or '-':7s} {str(k['registers']):>4s} regs  spills {str(k['spills']):>4s} B  "
              f"{k['name'][:90]}  {status}")
