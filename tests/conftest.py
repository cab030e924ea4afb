"""Test-session setup shared by every test module.

Triton decides between interpreter and compiler when a kernel module is imported, so the
interpreter switch must be set before any test imports k2sys.kernels: without a GPU, kernels
run under TRITON_INTERPRET=1.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(session, config, items):
    """Files holding a `slow` test run first (stable sort, tests keep their order inside a file), so
    that under `pytest -n N --dist loadfile` (scripts/test.sh) the long files start at once and the
    short ones fill the gaps, instead of one long file starting last and running alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)


@pytest.fixture(autouse=True, scope="module")
def _no_process_group_leaks_across_files():
    """Under xdist one worker process runs many files in turn: a file that leaves torch.distributed
    (or megatron's parallel state) initialised would make the next file's init_process_group fail."""
    yield
    import torch.distributed as dist

    if "megatron.core" in sys.modules:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
