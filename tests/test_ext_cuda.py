"""k2sys._cuda on a GPU: pipelined H2D (pinned and pageable), the H2D onload ring, the batched
strided device copy (one kernel) and device crc32c, each against torch / the CPU extension.
GPU-marked: deselected on CPU machines (the module still builds there with nvcc)."""

import pytest
import torch

from k2sys import ext

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not ext.HAS_CUDA, reason="needs k2sys._cuda and a CUDA device")]


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("nbytes", [1, 4095, (32 << 20) + 12345])  # tiny, unaligned, > one chunk
def test_h2d_copy_equals_source(pinned, nbytes):
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    if pinned:
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ext.h2d_copy_(dst, src, chunk_bytes=8 << 20, ring=3)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), src)


def test_onload_ring_tickets():
    ol = ext.Onloader("cuda", chunk_bytes=4 << 20, ring=3)
    srcs = [torch.randn(n) for n in (10, 3 << 20, 1 << 20)]
    dsts = [torch.empty(s.numel(), device="cuda") for s in srcs]
    tickets = [ol.submit(d, s) for d, s in zip(dsts, srcs)]
    ol.wait(tickets[-1])
    assert all(ol.done(t) for t in tickets)
    for d, s in zip(dsts, srcs):
        assert torch.equal(d.cpu(), s)


def test_batched_view_copy_on_device_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randn(6, 10, 12, device="cuda", generator=g)
    big = torch.randn(2, 3, 4, 5, 6, device="cuda", generator=g)
    dst = torch.zeros(3, 20, 12, device="cuda")
    dst_big = torch.zeros(2, 3, 4, 5, 6, device="cuda")
    pairs = [(dst[1, 4:14, :], src[2]), (dst[0, ::2, 3:7], src[5, 0:10, 1:5]),
             (dst_big[:, :, 1:3, :, 2:5], big[:, :, 0:2, :, 1:4])]
    want, want_big = dst.clone(), dst_big.clone()
    want[1, 4:14, :] = src[2]
    want[0, ::2, 3:7] = src[5, 0:10, 1:5]
    want_big[:, :, 1:3, :, 2:5] = big[:, :, 0:2, :, 1:4]
    ext.batched_view_copy_(pairs)
    torch.cuda.synchronize()
    assert torch.equal(dst, want) and torch.equal(dst_big, want_big)


@pytest.mark.parametrize("nbytes", [0, 1, 1000, (8 << 20) + 3])
def test_device_crc_equals_cpu_crc(nbytes):
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    assert ext.crc32c(data.cuda()) == ext.crc32c(data)
