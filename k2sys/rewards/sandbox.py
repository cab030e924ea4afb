"""Run model-written Python inside a bubblewrap sandbox, never on the host.

    code -> temp dir (host) -> bwrap: own user/pid/mount/net/ipc/uts/cgroup namespaces, no network,
    uid 65534 inside, caps dropped, no further user namespaces, /usr read-only, a size-capped fresh
    /tmp, nothing else of the host, a seccomp filter (k2sys.rewards.seccomp)
    -> a launcher sets the rlimits, then execs ``python3 -I -S main.py < stdin``
    -> stdout/stderr captured through size-capped files
    -> every process of the run is dead before ``run_python`` returns.

Limits (``SandboxConfig``), all set inside the sandbox by the launcher, soft = hard so the program
cannot raise them:

* ``max_processes`` -> RLIMIT_NPROC. The kernel counts it per (user namespace, uid) (Linux >= 5.14,
  "ucounts"), and every run gets a fresh user namespace, so the count is that run's own processes
  and threads (bwrap's init included), not the host user's. The kernel ignores RLIMIT_NPROC for
  host root, so when this process runs as root, bwrap is started as ``host_uid`` (default 65534,
  nobody) instead: then the sandbox's uid maps to an unprivileged host uid and the limit holds.
  (Consequence: everything bound into the sandbox -- ``python``, ``extra_ro_binds`` -- must be
  readable by that uid.) On kernels before 5.14 RLIMIT_NPROC counts all host processes of the
  uid, i.e. all concurrent sandboxes together. No cgroup is used.
* ``memory_limit_mb`` -> RLIMIT_AS and RLIMIT_DATA, per process: total memory of a run is bounded
  by ``max_processes * memory_limit_mb`` (plus the /tmp tmpfs, capped by ``tmpfs_size_mb``).
* ``max_file_bytes`` -> RLIMIT_FSIZE (at least ``max_output_bytes``: stdout/stderr are files too).
* RLIMIT_CPU = ceil(time_limit_s) + 1 s per process; RLIMIT_NOFILE = ``max_open_files``;
  RLIMIT_CORE = 0.

Cleanup: bwrap runs its command under its own init (pid 1 of the run's pid namespace) and exits
as soon as the command does, possibly leaving that init and the command's background children
behind. ``run_python`` reads the init's host pid from ``bwrap --info-fd``, holds a pidfd on it,
kills it (SIGKILL; the kernel then kills everything else in the pid namespace), and waits until the
pidfd reports the init's exit -- which the kernel only signals once every other process of the
namespace is gone. On timeout the same kill happens at once. A run whose processes could not be
confirmed dead is reported with ``SandboxResult.leaked`` (and is not ``ok``). Without pidfd_open
(Linux < 5.3) the kill and the check fall back to scanning /proc for the namespace's processes.
bwrap's init outlives bwrap by a moment, so its zombie is reaped by the host's pid 1 (or a child
subreaper), as before.

The interpreter inside is the system one (/usr/bin/python3) by default: the sandbox sees only /usr,
so a venv or pyenv interpreter elsewhere would need its prefix bound in, which
``SandboxConfig.python`` plus ``extra_ro_binds`` allow.
"""

from __future__ import annotations

import json
import logging
import math
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache

from k2sys.rewards.seccomp import SeccompUnsupported, build_filter

__all__ = ["SandboxConfig", "SandboxResult", "run_python", "bwrap_available", "SandboxUnavailable"]

log = logging.getLogger(__name__)


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create namespaces here."""


@dataclass(kw_only=True)
class SandboxConfig:
    time_limit_s: float = 2.0
    """Wall-clock limit per run; the whole sandbox is killed when it passes (plus 2 s of slack for
    bwrap's setup on a loaded machine; the CPU rlimit is the tight limit)."""
    memory_limit_mb: int = 256
    """Address-space and data limit (RLIMIT_AS, RLIMIT_DATA) of each sandboxed process."""
    max_output_bytes: int = 1 << 16
    """Cap on stdout and on stderr each."""
    max_processes: int = 32
    """RLIMIT_NPROC inside the run's own user namespace: processes and threads of the run, counting
    bwrap's init and the program itself."""
    max_file_bytes: int = 8 << 20
    """RLIMIT_FSIZE: the largest file the program may write (raised to max_output_bytes if lower)."""
    max_open_files: int = 64
    """RLIMIT_NOFILE."""
    tmpfs_size_mb: int = 64
    """Size of the writable /tmp (a tmpfs, so host memory); needs bwrap >= 0.8 to be enforced."""
    seccomp: bool = True
    """Load the syscall filter of k2sys.rewards.seccomp (x86_64/aarch64 hosts)."""
    host_uid: int | None = 65534
    """When this process is root: the host uid (and gid) to start bwrap as, since the kernel does not
    enforce RLIMIT_NPROC for root. None keeps root (then max_processes is not enforced)."""
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
        if not isinstance(self.max_processes, int) or self.max_processes < 3:
            # bwrap's init and the launcher/program take two; fewer than one more is not a sandbox
            # limit but a broken run.
            raise ValueError(f"SandboxConfig.max_processes must be an int >= 3, got {self.max_processes!r}")
        if not isinstance(self.max_file_bytes, int) or self.max_file_bytes < 1:
            raise ValueError(f"SandboxConfig.max_file_bytes must be an int >= 1, got {self.max_file_bytes!r}")
        if not isinstance(self.max_open_files, int) or self.max_open_files < 8:
            raise ValueError(f"SandboxConfig.max_open_files must be an int >= 8, got {self.max_open_files!r}")
        if not isinstance(self.tmpfs_size_mb, int) or self.tmpfs_size_mb < 1:
            raise ValueError(f"SandboxConfig.tmpfs_size_mb must be an int >= 1, got {self.tmpfs_size_mb!r}")
        if self.host_uid is not None and (not isinstance(self.host_uid, int) or self.host_uid <= 0):
            raise ValueError(f"SandboxConfig.host_uid must be a non-root uid or None, got {self.host_uid!r}")


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int
    timed_out: bool
    output_truncated: bool
    leaked: bool = False
    """Some process of the run could not be confirmed dead before returning (should never happen)."""

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.output_truncated and not self.leaked


# ---- bwrap command line ----------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _bwrap_options(bwrap: str) -> frozenset[str]:
    try:
        p = subprocess.run([bwrap, "--help"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    text = (p.stdout + p.stderr).decode(errors="replace")
    return frozenset(w for w in text.split() if w.startswith("--"))


def _root_binds() -> list[str]:
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _bwrap_argv(config: SandboxConfig, workdir: str, info_fd: int, seccomp_fd: int | None) -> list[str]:
    opts = _bwrap_options(config.bwrap)
    argv = [config.bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session",
            "--cap-drop", "ALL", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    if "--disable-userns" in opts:  # bwrap >= 0.8: max_user_namespaces = 0 inside (seccomp denies it too)
        argv += ["--disable-userns"]
    argv += _root_binds()
    for p in config.extra_ro_binds:
        argv += ["--ro-bind", p, p]
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if "--size" in opts:
        argv += ["--size", str(config.tmpfs_size_mb << 20)]
    argv += ["--tmpfs", "/tmp", "--ro-bind", workdir, "/sandbox", "--chdir", "/tmp",
             "--info-fd", str(info_fd)]
    if seccomp_fd is not None:
        argv += ["--seccomp", str(seccomp_fd)]
    return argv


# The first program inside: set the rlimits (here, inside the run's user namespace, so that
# RLIMIT_NPROC counts this run only), then become the real command.
_LAUNCHER = """\
import os, resource as r, sys
for n, v in zip(sys.argv[1].split(","), sys.argv[2].split(",")):
    k, v = getattr(r, n), int(v)
    h = r.getrlimit(k)[1]
    v = v if h == r.RLIM_INFINITY else min(v, h)
    r.setrlimit(k, (v, v))
os.execv(sys.argv[3], sys.argv[3:])
"""


def _launcher_argv(config: SandboxConfig, command: list[str]) -> list[str]:
    mem = config.memory_limit_mb << 20
    limits = {"RLIMIT_NPROC": config.max_processes, "RLIMIT_AS": mem, "RLIMIT_DATA": mem,
              "RLIMIT_CPU": math.ceil(config.time_limit_s) + 1,
              "RLIMIT_FSIZE": max(config.max_file_bytes, config.max_output_bytes),
              "RLIMIT_NOFILE": config.max_open_files, "RLIMIT_CORE": 0}
    return [config.python, "-I", "-S", "-c", _LAUNCHER, ",".join(limits),
            ",".join(str(v) for v in limits.values())] + command


@lru_cache(maxsize=1)
def _seccomp_program() -> bytes:
    return build_filter()


def _host_ids(config: SandboxConfig) -> int | None:
    return config.host_uid if os.geteuid() == 0 and config.host_uid is not None else None


# ---- the run's processes -----------------------------------------------------------------------------
class _InfoReader:
    """Reads bwrap's --info-fd JSON ({"child-pid": ..., "pid-namespace": ...}) as it arrives."""

    def __init__(self, fd: int):
        self.fd, self.buf, self.done = fd, b"", False

    def read(self, deadline: float) -> dict:
        """The info, or {} when bwrap gave none by ``deadline`` (or exited without it)."""
        while not self.done:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                break
            chunk = os.read(self.fd, 4096)
            self.buf += chunk
            if not chunk:
                self.done = True
                break
            try:
                info = json.loads(self.buf)
            except ValueError:
                continue
            self.done = True
            return info
        try:
            return json.loads(self.buf) if self.done and self.buf else {}
        except ValueError:
            return {}


def _pid_ns(pid: int) -> int | None:
    """Inode of ``pid``'s pid namespace; None when the process is gone or we may not look."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError:
        return None


def _ns_members(ns_ino: int) -> list[int]:
    """Host pids of the live (not zombie) processes in the pid namespace ``ns_ino``, of those whose
    namespace we may read. Only the fallback for kernels without pidfd_open uses this scan."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _pid_ns(int(entry.name)) == ns_ino:
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    state = f.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in (b"Z", b"X"):
                pids.append(int(entry.name))
    return pids


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _RunInit:
    """bwrap's init of one run (pid 1 of its pid namespace), held through a pidfd when possible.

    Killing it makes the kernel kill every process of the namespace; the init is only seen as
    exited (pidfd readable) after all of them are gone.
    """

    def __init__(self, info: dict):
        self.pid, self.ns = info.get("child-pid"), info.get("pid-namespace")
        self.pidfd: int | None = None
        if not isinstance(self.pid, int):
            self.pid = None
            return
        try:
            self.pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # already gone, and with it the namespace
            self.pid = None
            return
        except (OSError, AttributeError):  # no pidfd (kernel < 5.3): fall back to /proc scans
            self.pidfd = None
        if self.ns is not None:
            now = _pid_ns(self.pid)
            if now is None and os.path.exists(f"/proc/{self.pid}"):
                return  # alive but its namespace is not readable to us: trust the pidfd
            if now != self.ns:
                # Exited and its pid reused (or exited between the two calls): nothing of ours is left.
                self.close()
                self.pid = None

    def kill(self) -> None:
        if self.pid is None:
            return
        if self.pidfd is not None:
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        # No pidfd (best effort): the init by pid (checked against its namespace when we could),
        # and every process we can see in that namespace.
        _kill_all([self.pid] + (_ns_members(self.ns) if self.ns is not None else []))

    def wait_gone(self, timeout: float) -> bool:
        """True once every process of the run is confirmed dead."""
        if self.pid is None:
            return True
        deadline = time.monotonic() + timeout
        if self.pidfd is not None:
            poller = select.poll()
            poller.register(self.pidfd, select.POLLIN)
            return bool(poller.poll(max(0.0, timeout) * 1000))
        if self.ns is None:
            return False
        while True:
            left = _ns_members(self.ns)
            if not left:
                return True
            if time.monotonic() > deadline:
                return False
            _kill_all(left)
            time.sleep(0.01)

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _run_bwrap(config: SandboxConfig, src_dir: str, command: list[str], stdin: bytes, out, err,
               ) -> tuple[int, bool, bool]:
    """Run ``command`` in the sandbox; (returncode, timed_out, leaked). Nothing survives it."""
    seccomp_fd = None
    if config.seccomp:
        try:
            program = _seccomp_program()
        except SeccompUnsupported as e:
            raise SandboxUnavailable(str(e)) from None
        seccomp_fd = os.memfd_create("k2sys-seccomp", os.MFD_CLOEXEC)
        os.write(seccomp_fd, program)
        os.lseek(seccomp_fd, 0, os.SEEK_SET)
    info_r, info_w = os.pipe()
    reader = _InfoReader(info_r)
    uid = _host_ids(config)
    ids = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    fds = (info_w,) if seccomp_fd is None else (info_w, seccomp_fd)
    proc: subprocess.Popen | None = None
    init: _RunInit | None = None
    timed_out = leaked = False
    try:
        proc = subprocess.Popen(_bwrap_argv(config, src_dir, info_w, seccomp_fd) + command,
                                stdin=subprocess.PIPE, stdout=out, stderr=err, pass_fds=fds,
                                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                                start_new_session=True, **ids)
        os.close(info_w)
        info_w = -1
        deadline = time.monotonic() + config.time_limit_s + 2.0
        init = _RunInit(reader.read(deadline))
        try:
            proc.communicate(stdin, timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        except BrokenPipeError:  # program exited (or closed stdin) without reading all of it
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        # The command has exited, ran out of time, or we are unwinding: kill what is left of the
        # run -- background children, bwrap's init, bwrap -- and make sure it is gone.
        try:
            if proc is not None:
                leaked = not _end_run(proc, init, reader)
        finally:
            if init is not None:
                init.close()
            for fd in (info_r, info_w, seccomp_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
    return proc.returncode, timed_out, leaked


def _end_run(proc: subprocess.Popen, init: _RunInit | None, reader: _InfoReader) -> bool:
    """Kill every process of a run; True once all are confirmed dead."""
    if init is not None:
        init.kill()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap itself (its own session and group)
    proc.wait()
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    late = None
    if init is None or (init.pid is None and not reader.done):
        # bwrap had not reported its init yet (a very slow start): it has now, or never will.
        late = _RunInit(reader.read(time.monotonic() + 1.0))
        late.kill()
    try:
        gone = all([r.wait_gone(10.0) for r in (init, late) if r is not None])
    finally:
        if late is not None:
            late.close()
    if not gone:
        log.error("sandbox: processes of a run (init pid %s) survived SIGKILL",
                  (init if init is not None and init.pid is not None else late).pid)
    return gone


def _workspace(prefix: str, config: SandboxConfig) -> tempfile.TemporaryDirectory:
    work = tempfile.TemporaryDirectory(prefix=prefix)
    if _host_ids(config) is not None:
        os.chmod(work.name, 0o711)  # bwrap runs as host_uid and must reach src/ to bind it
    return work


@lru_cache(maxsize=8)
def bwrap_available(bwrap: str = "bwrap") -> tuple[bool, str]:
    """(True, "") when bubblewrap can build the sandbox here (with the default config), else (False, why)."""
    if shutil.which(bwrap) is None:
        return False, f"{bwrap!r} not found; install bubblewrap (apt-get install -y bubblewrap)"
    config = SandboxConfig(bwrap=bwrap, time_limit_s=8.0)
    with _workspace("k2sys-sbx-check-", config) as work:
        src = os.path.join(work, "src")
        os.mkdir(src)
        os.chmod(src, 0o755)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                rc, timed_out, _ = _run_bwrap(config, src, ["/bin/true"], b"", out, err)
            except (OSError, SandboxUnavailable) as e:
                return False, f"bwrap failed to start: {e}"
            err.seek(0)
            why = err.read().decode(errors="replace").strip()
        if timed_out:
            return False, "bwrap did not finish a trivial run in 10 s"
        if rc != 0:
            hint = ""
            if _host_ids(config) is not None:
                hint = (f" (bwrap ran as uid {config.host_uid} because this process is root; "
                        f"SandboxConfig(host_uid=None) keeps root, but then max_processes is not enforced)")
            return False, f"bwrap cannot create the sandbox here: {why or f'exit status {rc}'}{hint}"
    return True, ""


def run_python(code: str, stdin: str, config: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` with ``stdin`` inside the sandbox and capture its output."""
    config = config or SandboxConfig()
    ok, why = bwrap_available(config.bwrap)
    if not ok:
        raise SandboxUnavailable(why)
    with _workspace("k2sys-sbx-", config) as work:
        # Only src/ is bound into the sandbox; the capture files stay outside it.
        src_dir = os.path.join(work, "src")
        os.mkdir(src_dir, 0o755)
        os.chmod(src_dir, 0o755)
        src = os.path.join(src_dir, "main.py")
        with open(src, "w") as f:
            f.write(code)
        os.chmod(src, 0o644)
        out_path, err_path = os.path.join(work, ".stdout"), os.path.join(work, ".stderr")
        command = _launcher_argv(config, [config.python, "-I", "-S", "/sandbox/main.py"])
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            returncode, timed_out, leaked = _run_bwrap(config, src_dir, command, stdin.encode(), out, err)
        cap = config.max_output_bytes
        with open(out_path, "rb") as f:
            stdout = f.read(cap + 1)
        with open(err_path, "rb") as f:
            stderr = f.read(cap + 1)
        # bwrap reports a command killed by signal N as exit status 128 + N.
        truncated = len(stdout) >= cap or returncode in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ)
        # The CPU rlimit (SIGXCPU, then SIGKILL at the hard limit) is a timeout too.
        cpu_kill = {signal.SIGXCPU, signal.SIGKILL}
        if -returncode in cpu_kill or returncode - 128 in cpu_kill:
            timed_out = True
        return SandboxResult(stdout=stdout[:cap].decode(errors="replace"),
                             stderr=stderr[:cap].decode(errors="replace"),
                             returncode=returncode, timed_out=timed_out,
                             output_truncated=truncated, leaked=leaked)
