"""Native extension pieces of the checkpoint engine, each against an independent reference."""

import random

import pytest
import torch

from k2sys import ext

pytestmark = pytest.mark.skipif(not ext.HAS_CPP, reason="k2sys._C not built")


def crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """The textbook bit-at-a-time CRC-32C (reflected 0x82F63B78), independent of the C++ tables."""
    c = crc ^ 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


@pytest.mark.parametrize("impl", ["auto", "table"] + (["hw"] if ext._C.crc32c_hw_available() else []))
def test_crc32c_known_vectors(impl):
    # RFC 3720 (iSCSI) appendix B.4 and the standard check value.
    assert ext.crc32c(b"123456789", impl=impl) == 0xE3069283
    assert ext.crc32c(bytes(32), impl=impl) == 0x8A9136AA
    assert ext.crc32c(b"\xff" * 32, impl=impl) == 0x62A8AB43
    assert ext.crc32c(bytes(range(32)), impl=impl) == 0x46DD794E
    assert ext.crc32c(b"", impl=impl) == 0


def test_crc32c_matches_bitwise_reference_and_continues():
    rng = random.Random(0)
    for n in [1, 7, 8, 9, 63, 1000, 4099]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        ref = crc32c_bitwise(data)
        assert ext.crc32c(data) == ref
        assert ext.crc32c(data, impl="table") == ref
        # Unaligned start through a tensor view.
        t = torch.frombuffer(bytearray(b"x" + data), dtype=torch.uint8)[1:]
        assert ext.crc32c(t) == ref
        cut = rng.randrange(n + 1)
        assert ext.crc32c(data[cut:], ext.crc32c(data[:cut])) == ref
        assert ext.crc32c_combine(crc32c_bitwise(data[:cut]), crc32c_bitwise(data[cut:]), n - cut) == ref


def test_crc32c_many_parallel_chunks_equal_serial():
    g = torch.Generator().manual_seed(1)
    ts = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in [0, 5, (3 << 20) + 17, 9 << 20]]
    got = ext.crc32c_many(ts, threads=2)
    assert got == [ext.crc32c(t, impl="table") for t in ts]
    assert got[1] == crc32c_bitwise(ts[1].numpy().tobytes())
    ts[3][12345] ^= 1  # a flipped bit changes the sum
    assert ext.crc32c_many(ts)[3] != got[3]


def test_staging_pool_reuses_aligned_buffers():
    pool = ext.StagingPool(alignment=4096)
    a = pool.acquire(100_000)
    assert a.addr % 4096 == 0 and a.capacity >= 100_000 and a.tensor.numel() == 100_000
    a.tensor.fill_(7)
    addr = a.addr
    a.release()
    b = pool.acquire(90_000)  # same capacity bin -> same memory, no new allocation
    assert b.addr == addr
    st = pool.stats()
    assert st["allocations"] == 1 and st["reuses"] == 1 and st["bytes_leased"] == b.capacity
    with pytest.raises(ValueError, match="released twice"):
        b.release()
        pool.release(b)
    pool.trim()
    assert pool.stats()["bytes_cached"] == 0
    with pytest.raises(ValueError, match="power of two"):
        ext.StagingPool(alignment=3000)


@pytest.mark.parametrize("src_pinned", [True, False])
def test_cpu_onloader_tickets_and_bytes(src_pinned):
    g = torch.Generator().manual_seed(2)
    srcs = [torch.randn(n, generator=g) for n in [0, 1000, (1 << 20) + 3, 3 << 20]]
    dsts = [torch.empty_like(s) for s in srcs]
    ol = ext.Onloader("cpu", chunk_bytes=1 << 20, ring=2, threads=2)
    tickets = [ol.submit(d, s, src_pinned=src_pinned) for d, s in zip(dsts, srcs)]
    assert tickets == sorted(tickets)
    ol.wait(tickets[-1])
    assert all(ol.done(t) for t in tickets)  # in-order completion, like events on one stream
    for d, s in zip(dsts, srcs):
        assert torch.equal(d, s)
    with pytest.raises(ValueError, match="bytes"):
        ol.submit(torch.empty(3), torch.empty(4))


def test_onloader_many_small_jobs_then_synchronize():
    ol = ext.Onloader("cpu", chunk_bytes=4096, ring=3, threads=2)
    src = torch.arange(50_000, dtype=torch.int32)
    dst = torch.zeros_like(src)
    for i in range(0, 50_000, 5_000):
        ol.submit(dst[i:i + 5_000], src[i:i + 5_000], src_pinned=False)
    ol.synchronize()
    assert torch.equal(dst, src)


def test_batched_view_copy_matches_torch_slicing():
    g = torch.Generator().manual_seed(3)
    src_a = torch.randn(6, 10, 12, generator=g)
    src_b = torch.randint(0, 100, (40, 9), dtype=torch.int16, generator=g)
    big = torch.randn(2, 3, 4, 5, 6, generator=g)  # 5-D: unrolled into several rows
    dst_a = torch.zeros(3, 20, 12)
    dst_b = torch.zeros(9, 40, dtype=torch.int16)
    dst_big = torch.zeros(2, 3, 4, 5, 6)
    pairs = [
        (dst_a[1, 4:14, :], src_a[2, :, :]),           # contiguous rows
        (dst_a[0, ::2, 3:7], src_a[5, 0:10, 1:5]),      # strided dst and src
        (dst_b.t()[5:25], src_b[0:20]),                 # transposed dst: element-wise runs
        (dst_big[:, :, 1:3, :, 2:5], big[:, :, 0:2, :, 1:4]),
        (dst_a[2, 0:0], src_a[0, 0:0]),                 # empty
    ]
    expect = [d.clone() for d in (dst_a, dst_b, dst_big)]
    ref_pairs = [(expect[0][1, 4:14, :], src_a[2]), (expect[0][0, ::2, 3:7], src_a[5, 0:10, 1:5]),
                 (expect[1].t()[5:25], src_b[0:20]), (expect[2][:, :, 1:3, :, 2:5], big[:, :, 0:2, :, 1:4])]
    for d, s in ref_pairs:
        d.copy_(s)
    ext.batched_view_copy_(pairs, threads=2)
    for got, ref in zip((dst_a, dst_b, dst_big), expect):
        assert torch.equal(got, ref)


def test_batched_strided_copy_large_multithreaded():
    g = torch.Generator().manual_seed(4)
    src = torch.randn(64, 512, 130, generator=g)  # 17 MB: crosses the threading threshold
    dst = torch.zeros(64, 300, 130)
    ext.batched_view_copy_([(dst[:, 10:266], src[:, 256:512])], threads=2)
    assert torch.equal(dst[:, 10:266], src[:, 256:512])
    assert dst[:, :10].abs().sum() == 0 and dst[:, 266:].abs().sum() == 0


def test_strided_rows_errors_name_the_problem():
    with pytest.raises(ValueError, match="pair 0"):
        ext.view_copy_rows([(torch.zeros(3), torch.zeros(4))])
    with pytest.raises(ValueError, match="int64"):
        ext.batched_strided_copy_(torch.zeros(1, 12))
    bad = torch.tensor([[1, 2, -1, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.int64)
    with pytest.raises(ValueError, match="row 0"):
        ext.batched_strided_copy_(bad)


def test_crc32c_three_stream_path_matches_table():
    # The hardware path folds three interleaved crc32 streams over 3 x 8 KiB and 3 x 256 B blocks:
    # lengths around those block boundaries and unaligned starts against the table path.
    g = torch.Generator().manual_seed(5)
    buf = torch.randint(0, 256, (3 * 8192 * 3 + 4096,), dtype=torch.uint8, generator=g)
    for n in [767, 768, 769, 24575, 24576, 24577, 3 * 24576 + 3 * 256 + 5]:
        for off in [0, 1, 5, 8]:
            view = buf[off:off + n]
            assert ext.crc32c(view) == ext.crc32c(view, impl="table"), (n, off)


def test_crc32c_folding_path_matches_table_and_continues():
    # From 512 bytes the hardware path folds 256-byte strides with carry-less multiplies (AVX-512
    # VPCLMULQDQ, where the CPU has it), then 16-byte blocks, then a byte tail: lengths around each
    # boundary, unaligned starts, and a crc carried over from a previous call, against the table path.
    g = torch.Generator().manual_seed(6)
    buf = torch.randint(0, 256, (70000,), dtype=torch.uint8, generator=g)
    lengths = [511, 512, 513, 527, 528, 767, 768, 769, 1023, 1024, 1040, 4096 + 15, 65536, 69000]
    for n in lengths:
        for off in [0, 1, 7, 63]:
            view = buf[off:off + n]
            want = ext.crc32c(view, impl="table")
            assert ext.crc32c(view) == want, (n, off)
            for cut in (1, 300, n // 2):
                assert ext.crc32c(view[cut:], ext.crc32c(view[:cut])) == want, (n, off, cut)
    assert ext.crc32c(bytes(600)) == crc32c_bitwise(bytes(600))
    assert ext.crc32c(b"\xff" * 1000) == crc32c_bitwise(b"\xff" * 1000)


def test_streaming_copy_and_zero_are_exact_at_odd_offsets():
    # Copies and zeroing of >= 1 MiB use streaming stores after an unaligned head: every byte lands,
    # and nothing outside the region is touched.
    g = torch.Generator().manual_seed(6)
    src = torch.randint(0, 256, ((4 << 20) + 300,), dtype=torch.uint8, generator=g)
    for off_s, off_d, n in [(0, 0, 1 << 20), (3, 61, (1 << 20) + 77), (17, 1, (3 << 20) + 255)]:
        dst = torch.full((n + 128,), 9, dtype=torch.uint8)
        ext.host_copy_(dst[off_d:off_d + n], src[off_s:off_s + n], threads=2)
        assert torch.equal(dst[off_d:off_d + n], src[off_s:off_s + n])
        assert int(dst[:off_d].ne(9).sum()) == 0 and int(dst[off_d + n:].ne(9).sum()) == 0
        ext.require_cpp().batched_zero_ptr([dst.data_ptr() + off_d], [n], 2)
        assert int(dst[off_d:off_d + n].count_nonzero()) == 0
        assert int(dst[:off_d].ne(9).sum()) == 0 and int(dst[off_d + n:].ne(9).sum()) == 0


def test_import_k2sys_sets_thp_allocation_default_and_keeps_user_choice():
    """k2sys turns on torch's huge-page host allocations before torch loads (k2sys/__init__.py), and a
    user's own THP_MEM_ALLOC_ENABLE wins."""
    import os
    import subprocess
    import sys

    code = "import os, k2sys; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr
    env["THP_MEM_ALLOC_ENABLE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr
