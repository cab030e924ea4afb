"""k2sys: the Kimi-K2 post-training system (SFT -> RL) on Megatron + SGLang/native inference."""

import os as _os

__version__ = "0.1.0"

# Host allocations of >= 2 MiB on transparent huge pages (torch's CPU allocator reads this once, at the
# process's first allocation, so it takes effect when k2sys is imported before torch: the CLI, the
# benchmarks). A colocated switch pages trainer state and the engine's re-packed weights into memory
# that was just released: with 2 MiB pages k2-small's repack went from ~0.04 to ~0.02 s and its switch
# from 0.22 to 0.17 s (benchmarks/bench_switch.py, CI machine, kernel THP mode "madvise"). Set
# THP_MEM_ALLOC_ENABLE=0 to keep 4 KiB pages.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
