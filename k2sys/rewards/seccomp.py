"""A seccomp filter for the code sandbox, written as a classic-BPF program by hand.

bubblewrap loads it (``bwrap --seccomp FD``) right before it executes the sandboxed command, with
``no_new_privs`` set, so it binds the program and everything it starts. The filter:

* denies with EPERM the syscalls a contest program never needs and an escape usually does:
  ptrace, process_vm_readv/writev, pidfd_getfd, kcmp, setns, mount and the new mount API,
  umount2, pivot_root, chroot, keyctl/add_key/request_key, bpf, perf_event_open, userfaultfd,
  io_uring_*, kexec_*, (f)init_module/delete_module, and the host-administration calls
  (reboot, swapon, acct, settimeofday, sethostname, ...);
* denies ``clone`` and ``unshare`` with EPERM when their flags (args[0], low 32 bits) carry any
  ``CLONE_NEW*`` bit, so no nested user/pid/mount/net/... namespace can be made; plain fork and
  thread creation stay allowed;
* answers ``clone3`` with ENOSYS: its flags live in a struct in memory that a filter cannot
  read, and glibc falls back to ``clone`` (whose flags it can check) on ENOSYS;
* denies every syscall made through another ABI than the native one (i386 ``int 0x80`` on x86-64,
  arm32 on aarch64: the numbers differ there) and, on x86-64, any x32 syscall (number with bit 30
  set).

Supported hosts: x86-64 and aarch64 (little-endian). ``build_filter`` raises ``SeccompUnsupported``
elsewhere, and the sandbox then refuses to run unless the filter is switched off.
"""

from __future__ import annotations

import errno
import platform
import struct

__all__ = ["SeccompUnsupported", "build_filter", "host_arch", "AUDIT_ARCH", "DENY", "CLONE_NS_FLAGS",
           "UNSHARE_NS_FLAGS", "SECCOMP_RET_ALLOW", "SECCOMP_RET_ERRNO", "SYSCALLS"]


class SeccompUnsupported(RuntimeError):
    """The host's architecture has no filter here."""


# ---- constants (linux/seccomp.h, linux/audit.h, linux/filter.h, linux/sched.h) ----------------
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data { int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]; }
_OFF_NR, _OFF_ARCH, _OFF_ARG0_LO = 0, 4, 16  # args[0] low word: little-endian hosts only

_BPF_LD_W_ABS = 0x20    # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15       # BPF_JMP | BPF_JEQ | BPF_K
_BPF_JGE_K = 0x35       # BPF_JMP | BPF_JGE | BPF_K
_BPF_JSET_K = 0x45      # BPF_JMP | BPF_JSET | BPF_K
_BPF_RET_K = 0x06       # BPF_RET | BPF_K

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NS_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER
                  | CLONE_NEWPID | CLONE_NEWNET)
"""Namespace bits of clone(2). CLONE_NEWTIME (0x80) is not among them: in clone(2)'s flags the low
byte is the exit signal, and the kernel only takes CLONE_NEWTIME from unshare(2) and clone3."""
UNSHARE_NS_FLAGS = CLONE_NS_FLAGS | CLONE_NEWTIME

# ---- syscall numbers ----------------------------------------------------------------------------
# x86-64: arch/x86/entry/syscalls/syscall_64.tbl; aarch64: include/uapi/asm-generic/unistd.h.
# None = the call does not exist on that architecture.
SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    #  name                 x86_64  aarch64
    "clone": (56, 220),
    "unshare": (272, 97),
    "clone3": (435, 435),
    # tracing / reading other processes
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
    "kcmp": (312, 272),
    "process_madvise": (440, 440),
    # namespaces and mounts
    "setns": (308, 268),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    # kernel attack surface a contest program has no use for
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "create_module": (174, None),
    "get_kernel_syms": (177, None),
    "query_module": (178, None),
    "uselib": (134, None),
    "_sysctl": (156, None),
    "nfsservctl": (180, None),
    "lookup_dcookie": (212, 18),
    "open_by_handle_at": (304, 265),
    "name_to_handle_at": (303, 264),
    "fanotify_init": (300, 262),
    "move_pages": (279, 239),
    # host administration
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "acct": (163, 89),
    "syslog": (103, 116),
    "quotactl": (179, 60),
    "quotactl_fd": (443, 443),
    "settimeofday": (164, 170),
    "clock_settime": (227, 112),
    "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "sethostname": (170, 161),
    "setdomainname": (171, 162),
    "vhangup": (153, 58),
    "iopl": (172, None),
    "ioperm": (173, None),
}
_FLAG_CHECKED = {"clone": CLONE_NS_FLAGS, "unshare": UNSHARE_NS_FLAGS}
_ENOSYS = ("clone3",)
DENY = tuple(n for n in SYSCALLS if n not in _FLAG_CHECKED and n not in _ENOSYS)
"""Syscalls answered with EPERM whatever their arguments."""


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


class _Asm:
    """A tiny assembler: forward jumps to labels, resolved to the 8-bit offsets of sock_filter."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        assert name not in self.labels, name
        self.labels[name] = len(self.ins)

    def ld(self, off: int) -> None:
        self.ins.append((_BPF_LD_W_ABS, 0, 0, off))

    def jump(self, code: int, k: int, jt: object, jf: object) -> None:
        """jt/jf: a label, or 0 for the next instruction."""
        self.ins.append((code, jt, jf, k))

    def ret(self, k: int) -> None:
        self.ins.append((_BPF_RET_K, 0, 0, k))

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.ins):
            offs = []
            for tgt in (jt, jf):
                off = tgt if isinstance(tgt, int) else self.labels[tgt] - (i + 1)
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump out of range at {i}: {off}")
                offs.append(off)
            out += struct.pack("=HBBI", code, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)


def build_filter(arches: tuple[str, ...] | None = None) -> bytes:
    """The filter program as bytes of ``struct sock_filter`` (8 bytes each), for ``bwrap --seccomp``.

    ``arches``: the architectures to give a syscall table (default: the host's, which must be
    x86_64 or aarch64). A syscall from any other architecture is denied with EPERM.
    """
    if arches is None:
        arch = host_arch()
        if arch not in AUDIT_ARCH:
            raise SeccompUnsupported(f"no seccomp syscall table for architecture {arch!r} "
                                     f"(have {sorted(AUDIT_ARCH)}); run with SandboxConfig(seccomp=False) "
                                     f"only if you accept an unfiltered sandbox")
        if struct.pack("=I", 1) != struct.pack("<I", 1):
            raise SeccompUnsupported("the filter reads clone flags as a little-endian word")
        arches = (arch,)
    col = {"x86_64": 0, "aarch64": 1}
    eperm, enosys = SECCOMP_RET_ERRNO | errno.EPERM, SECCOMP_RET_ERRNO | errno.ENOSYS

    a = _Asm()
    a.ld(_OFF_ARCH)
    for arch in arches:
        a.jump(_BPF_JEQ_K, AUDIT_ARCH[arch], f"{arch}:start", 0)
    a.jump(_BPF_JEQ_K, 0, "eperm", "eperm")  # any other ABI: deny (unconditional jump, fits 8 bits)
    for arch in arches:
        c = col[arch]
        a.label(f"{arch}:start")
        a.ld(_OFF_NR)
        if arch == "x86_64":
            a.jump(_BPF_JGE_K, X32_SYSCALL_BIT, "eperm", 0)
        for name in _FLAG_CHECKED:
            a.jump(_BPF_JEQ_K, SYSCALLS[name][c], f"{arch}:{name}", 0)
        for name in _ENOSYS:
            a.jump(_BPF_JEQ_K, SYSCALLS[name][c], "enosys", 0)
        for name in DENY:
            nr = SYSCALLS[name][c]
            if nr is not None:
                a.jump(_BPF_JEQ_K, nr, "eperm", 0)
        a.jump(_BPF_JEQ_K, 0, "allow", "allow")
        for name, mask in _FLAG_CHECKED.items():
            a.label(f"{arch}:{name}")
            a.ld(_OFF_ARG0_LO)
            a.jump(_BPF_JSET_K, mask, "eperm", "allow")
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("eperm")
    a.ret(eperm)
    a.label("enosys")
    a.ret(enosys)
    return a.assemble()
