// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78): the per-bucket integrity check of the
// checkpoint engine. Software slicing-by-8 everywhere, SSE4.2 crc32 instructions when the CPU
// has them (three interleaved streams), carry-less multiplication folding from 512 bytes on CPUs
// with AVX-512 VPCLMULQDQ (~2x the crc32 streams on cached data), and a zlib-style combine so chunks hashed on different threads (or GPU blocks)
// fold into the crc of the whole buffer.
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys {

enum class CrcImpl { kAuto = 0, kTable = 1, kHardware = 2 };

bool crc32c_hw_available();

// Standard crc32c of n bytes (init and final xor 0xFFFFFFFF), continuing from `crc` (the
// result of a previous call, 0 to start): crc32c(b"123456789") == 0xE3069283.
std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t n, CrcImpl impl = CrcImpl::kAuto);

// crc of A||B from crc(A), crc(B) and len(B).
std::uint32_t crc32c_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b);

// The operator that appends len zero bytes, for folding many equal-length segments cheaply:
// crc(A||B) = crc32c_shift(op(len(B)), crc(A)) ^ crc(B).
std::uint32_t crc32c_zeros_op(std::uint64_t len);
std::uint32_t crc32c_shift(std::uint32_t op, std::uint32_t crc);

// crc32c of each of n buffers, hashed in chunks over the thread pool and combined.
void crc32c_batched(const std::uint64_t* ptrs, const std::uint64_t* sizes, std::size_t n, std::uint32_t* out,
                    int threads, CrcImpl impl = CrcImpl::kAuto);

}  // namespace k2sys
