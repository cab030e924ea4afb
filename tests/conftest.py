"""Test-session setup shared by every test module.

Triton decides between interpreter and compiler when a kernel module is imported, so the
interpreter switch must be set before any test imports k2sys.kernels: without a GPU, kernels
run under TRITON_INTERPRET=1.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
