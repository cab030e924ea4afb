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

}  // namespace k2sys
