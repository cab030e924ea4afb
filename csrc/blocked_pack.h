// Row-major fp32 weights -> the blocked layout oneDNN packs inner-product weights into, written in
// place into a buffer the packed tensor already owns (k2sys/engine/core/packed_layout.py).
//
// A weight W [N, K] (row stride `ld` floats) is padded to N' = ceil(N / bn) * bn rows and
// K' = ceil(K / bk) * bk columns (padding is zero) and cut into bn x bk blocks. Block (nb, kb) is
// the block_index-th block of the buffer, block_index = outer_n_major ? nb * KB + kb : kb * NB + nb,
// and inside a block element (n, k) sits at n_fastest ? k * bn + n : n * bk + k. oneDNN's
// AB16b64a (AVX-512 fp32, bn = 64, bk = 16, n fastest, n-blocks outer) is one case.
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys {

struct BlockedLayout {
  std::int64_t bn = 0, bk = 0;
  bool n_fastest = true, outer_n_major = true;
};

// Elements of the packed buffer (N' * K'); throws std::invalid_argument on a bad layout or shape.
std::int64_t blocked_numel(std::int64_t n, std::int64_t k, const BlockedLayout& lay);

// dst (blocked_numel floats) <- W. threads <= 0: the whole pool. dst and src must not overlap.
void pack_blocked_f32(float* dst, const float* src, std::int64_t n, std::int64_t k, std::int64_t ld,
                      const BlockedLayout& lay, int threads);

}  // namespace k2sys
