"""Test-session setup shared by every test module.

Triton decides between interpreter and compiler when a kernel module is imported, so the
interpreter switch must be set before any test imports k2sys.kernels: without a GPU, kernels
run under TRITON_INTERPRET=1.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(session, config, items):
    """Files holding a `slow` test run first (stable sort, tests keep their order inside a file), so
    that under `pytest -n N --dist loadfile` (scripts/test.sh) the long files start at once and the
    short ones fill the gaps, instead of one long file starting last and running alone."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)
