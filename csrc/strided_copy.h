// Batched strided box copies: the apply step of a reshard plan in one call.
//
// A box copy of up to 4-D boxes is described by one row of kStridedCols int64 values
// (the Python planner coalesces dims so the innermost one is a contiguous byte run):
//   [dst, src, run_bytes, n0, n1, n2, dst_s0, dst_s1, dst_s2, src_s0, src_s1, src_s2]
// It copies n0*n1*n2 runs of run_bytes each; run (i0, i1, i2) starts at
//   dst + i0*dst_s0 + i1*dst_s1 + i2*dst_s2  and  src + i0*src_s0 + i1*src_s1 + i2*src_s2
// (strides in bytes; unused outer dims have count 1).
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys {

constexpr int kStridedCols = 12;

struct StridedRow {
  std::int64_t dst, src, run_bytes, n[3], dst_s[3], src_s[3];
};
static_assert(sizeof(StridedRow) == kStridedCols * sizeof(std::int64_t), "row layout");

// Validates counts and run sizes (throws std::invalid_argument naming the row).
std::uint64_t strided_rows_bytes(const StridedRow* rows, std::size_t n);

// Applies n rows over the thread pool, balanced by bytes. Destinations must not overlap.
void batched_strided_copy(const StridedRow* rows, std::size_t n, int threads, std::int64_t chunk_bytes);

// The same copies with the crc32c of a byte region [base, base + len) fused in: the region is
// either the rows' source (`crc_source`: every piece is hashed, then copied while it is still in
// cache: a verify-then-apply that reads the bucket once) or their destination (hashed right after
// it is written: a pack whose checksum reads no memory twice). Pieces are <= chunk_bytes (256 KiB
// when 0). The rows' side in the region must be contiguous per row (packed strides), inside the
// region and non-overlapping; region bytes no row touches are hashed on their own. Returns false
// (copying nothing) when the rows do not qualify; the caller then copies and hashes separately.
bool batched_strided_copy_crc(const StridedRow* rows, std::size_t n, int threads, std::int64_t chunk_bytes,
                              std::uintptr_t base, std::uint64_t len, bool crc_source, std::uint32_t* crc_out);

}  // namespace k2sys
