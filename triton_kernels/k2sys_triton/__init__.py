"""k2sys Triton kernels, installed as the `k2sys_triton` package.

The folder is named triton_kernels in the source tree, but it must never be imported under
that name: triton-lang ships its own `triton_kernels` package, which SGLang imports. Use
`k2sys.kernels` (the public facade) or `k2sys_triton` directly.
"""
