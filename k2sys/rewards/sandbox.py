"""Run model-written Python inside a bubblewrap sandbox, never on the host.

    code -> temp dir (host) -> bwrap --unshare-all (no network, own pid/mount/user/ipc/uts
    namespaces, uid 65534, caps dropped; /usr read-only, fresh /tmp, nothing else of the host)
    -> python3 -I -S code.py < stdin, under rlimits (address space, CPU seconds, file size,
    open files) and a wall-clock kill -> stdout/stderr captured through size-capped files.

The interpreter inside is the system one (/usr/bin/python3) by default: the sandbox sees
only /usr, so a venv or pyenv interpreter elsewhere would need its prefix bound in, which
``SandboxConfig.python`` plus ``extra_ro_binds`` allow.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = ["SandboxConfig", "SandboxResult", "run_python", "bwrap_available", "SandboxUnavailable"]


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here."""


@dataclass(kw_only=True)
class SandboxConfig:
    time_limit_s: float = 2.0
    """Wall-clock limit per run; the whole sandbox is killed when it passes."""
    memory_limit_mb: int = 256
    """Address-space limit (RLIMIT_AS) of the sandboxed process tree."""
    max_output_bytes: int = 1 << 16
    """Cap on stdout and on stderr each (RLIMIT_FSIZE on the capture files)."""
    python: str = "/usr/bin/python3"
    bwrap: str = "bwrap"
    extra_ro_binds: tuple[str, ...] = field(default_factory=tuple)
    """Extra host paths bound read-only at the same place (e.g. another interpreter's prefix)."""

    def __post_init__(self) -> None:
        if not self.time_limit_s > 0:
            raise ValueError(f"SandboxConfig.time_limit_s must be > 0, got {self.time_limit_s!r}")
        if not isinstance(self.memory_limit_mb, int) or self.memory_limit_mb < 32:
            raise ValueError(f"SandboxConfig.memory_limit_mb must be an int >= 32, got {self.memory_limit_mb!r}")
        if not isinstance(self.max_output_bytes, int) or self.max_output_bytes < 1:
            raise ValueError(f"SandboxConfig.max_output_bytes must be an int >= 1, got {self.max_output_bytes!r}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    output_truncated: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated


def _root_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _bwrap_argv(config: SandboxConfig, workdir: str) -> list[str]:
    argv = [config.bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    argv += _root_binds()
    for p in config.extra_ro_binds:
        argv += ["--ro-bind", p, p]
    argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
             "--ro-bind", workdir, "/sandbox", "--chdir", "/tmp"]
    return argv


@lru_cache(maxsize=8)
def bwrap_available(bwrap: str = "bwrap") -> tuple[bool, str]:
    """(True, "") when bubblewrap can build the sandbox here, else (False, why)."""
    if shutil.which(bwrap) is None:
        return False, f"{bwrap!r} not found; install bubblewrap (apt-get install -y bubblewrap)"
    with tempfile.TemporaryDirectory() as d:
        argv = _bwrap_argv(SandboxConfig(bwrap=bwrap), d) + ["/bin/true"]
        try:
            p = subprocess.run(argv, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as e:
            return False, f"bwrap failed to start: {e}"
        if p.returncode != 0:
            return False, f"bwrap cannot create namespaces here: {p.stderr.decode(errors='replace').strip()}"
    return True, ""


def _limits(config: SandboxConfig):
    mem = config.memory_limit_mb << 20
    cpu = int(config.time_limit_s) + 1

    def apply() -> None:  # runs in the child between fork and exec of bwrap
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (config.max_output_bytes, config.max_output_bytes))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_python(code: str, stdin: str, config: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` with ``stdin`` inside the sandbox and capture its output."""
    config = config or SandboxConfig()
    ok, why = bwrap_available(config.bwrap)
    if not ok:
        raise SandboxUnavailable(why)
    with tempfile.TemporaryDirectory(prefix="k2sys-sbx-") as work:
        # Only src/ is bound into the sandbox; the capture files stay outside it.
        src_dir = os.path.join(work, "src")
        os.mkdir(src_dir, 0o755)
        os.chmod(src_dir, 0o755)
        src = os.path.join(src_dir, "main.py")
        with open(src, "w") as f:
            f.write(code)
        os.chmod(src, 0o644)
        argv = _bwrap_argv(config, src_dir) + [config.python, "-I", "-S", "/sandbox/main.py"]
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                    preexec_fn=_limits(config), start_new_session=True)
            timed_out = False
            try:
                # The CPU rlimit is the real limit; the wall clock adds slack for bwrap's namespace
                # setup on a loaded machine (and still stops programs that sleep or block).
                proc.communicate(stdin.encode(), timeout=config.time_limit_s + 2.0)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)  # bwrap's own group; the pid namespace dies with it
                proc.wait()
            except BrokenPipeError:  # program exited without reading all of stdin
                proc.wait()
        cap = config.max_output_bytes
        with open(out_path, "rb") as f:
            stdout = f.read(cap + 1)
        with open(err_path, "rb") as f:
            stderr = f.read(cap + 1)
        truncated = len(stdout) >= cap or proc.returncode == -signal.SIGXFSZ
        # The CPU rlimit (SIGXCPU, then SIGKILL at the hard limit) is a timeout too; bwrap reports a
        # child killed by signal N as exit status 128 + N.
        cpu_kill = {signal.SIGXCPU, signal.SIGKILL}
        if proc.returncode is not None and (-proc.returncode in cpu_kill or proc.returncode - 128 in cpu_kill):
            timed_out = True
        return SandboxResult(stdout=stdout[:cap].decode(errors="replace"),
                             stderr=stderr[:cap].decode(errors="replace"),
                             returncode=proc.returncode, timed_out=timed_out,
                             output_truncated=truncated)
