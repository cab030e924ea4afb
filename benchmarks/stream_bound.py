"""CopyBound with a third plain-copy implementation: streaming (non-temporal) stores.

glibc's memcpy streams only copies above its non-temporal threshold (3/4 of the last-level cache:
~190 MB on the 260 MB-L3 dev VM), so the libc and torch copies of the MB-sized pieces of a trainer
state or a bucket write through the cache (read-for-ownership of every destination line) and run
~1.3-1.8x slower than a streaming copy. The k2sys host copies stream (csrc/stream_copy.h), so a
bound without a streaming copy is one the system beats. "stream" copies each chunk with one C++
thread through k2sys._C.copy_ptr(threads=1), i.e. the same kernel the system uses, with the
bound's static split and none of the system's bookkeeping.

To move into common.CopyBound as a third entry of IMPLS (common.py belongs to the bound rule).
"""

from __future__ import annotations

from common import CopyBound
from k2sys import ext


class StreamCopyBound(CopyBound):
    """common.CopyBound whose per-round bound is the fastest of memcpy / torch / stream."""

    IMPLS = CopyBound.IMPLS + ("stream",)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("impls", self.IMPLS)
        super().__init__(*args, **kwargs)

    def _job(self, impl, pieces):
        if impl != "stream":
            return super()._job(impl, pieces)
        cpp = ext.require_cpp()

        def job():  # pointers read at call time, as the other implementations do
            for d, s in pieces:
                cpp.copy_ptr(d.data_ptr(), s.data_ptr(), d.numel(), 1, 0)
        return job
