#include "blocked_pack.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "thread_pool.h"

namespace k2sys {

namespace {

inline std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// 8 x 8 transpose of src rows (stride ls floats) into dst rows (stride ld floats).
__attribute__((target("avx"))) inline void transpose8_avx(float* dst, std::int64_t ldd, const float* src,
                                                          std::int64_t lds) {
  __m256 r0 = _mm256_loadu_ps(src + 0 * lds), r1 = _mm256_loadu_ps(src + 1 * lds);
  __m256 r2 = _mm256_loadu_ps(src + 2 * lds), r3 = _mm256_loadu_ps(src + 3 * lds);
  __m256 r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds);
  __m256 r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
  __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * ldd, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * ldd, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(s3, s7, 0x31));
}

inline void transpose8_scalar(float* dst, std::int64_t ldd, const float* src, std::int64_t lds) {
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
}

using Transpose8 = void (*)(float*, std::int64_t, const float*, std::int64_t);

Transpose8 pick_transpose() {
  static const Transpose8 fn = __builtin_cpu_supports("avx") ? transpose8_avx : transpose8_scalar;
  return fn;
}

// One n-fastest block: dst[k * bn + n] = W[n0 + n, k0 + k] for n < nv, k < kv; zero elsewhere.
void block_n_fastest(float* dst, const float* src, std::int64_t ld, std::int64_t nv, std::int64_t kv,
                     std::int64_t bn, std::int64_t bk, Transpose8 t8) {
  const std::int64_t n8 = nv / 8 * 8, k8 = kv / 8 * 8;
  for (std::int64_t n = 0; n < n8; n += 8)
    for (std::int64_t k = 0; k < k8; k += 8) t8(dst + k * bn + n, bn, src + n * ld + k, ld);
  for (std::int64_t k = 0; k < bk; ++k) {  // ragged edges and padding
    float* d = dst + k * bn;
    if (k >= kv) {
      std::memset(d, 0, sizeof(float) * bn);
      continue;
    }
    if (k >= k8)
      for (std::int64_t n = 0; n < n8; ++n) d[n] = src[n * ld + k];
    for (std::int64_t n = n8; n < nv; ++n) d[n] = src[n * ld + k];
    if (nv < bn) std::memset(d + nv, 0, sizeof(float) * (bn - nv));
  }
}

// One k-fastest block: dst[n * bk + k] = W[n0 + n, k0 + k]; rows of kv contiguous floats.
void block_k_fastest(float* dst, const float* src, std::int64_t ld, std::int64_t nv, std::int64_t kv,
                     std::int64_t bn, std::int64_t bk) {
  for (std::int64_t n = 0; n < bn; ++n) {
    float* d = dst + n * bk;
    if (n < nv) {
      std::memcpy(d, src + n * ld, sizeof(float) * kv);
      if (kv < bk) std::memset(d + kv, 0, sizeof(float) * (bk - kv));
    } else {
      std::memset(d, 0, sizeof(float) * bk);
    }
  }
}

}  // namespace

std::int64_t blocked_numel(std::int64_t n, std::int64_t k, const BlockedLayout& lay) {
  if (lay.bn <= 0 || lay.bk <= 0)
    throw std::invalid_argument("pack_blocked_f32: block sizes must be positive, got bn=" + std::to_string(lay.bn) +
                                " bk=" + std::to_string(lay.bk));
  if (n <= 0 || k <= 0)
    throw std::invalid_argument("pack_blocked_f32: weight must be non-empty, got [" + std::to_string(n) + ", " +
                                std::to_string(k) + "]");
  return ceil_div(n, lay.bn) * lay.bn * ceil_div(k, lay.bk) * lay.bk;
}

void pack_blocked_f32(float* dst, const float* src, std::int64_t n, std::int64_t k, std::int64_t ld,
                      const BlockedLayout& lay, int threads) {
  blocked_numel(n, k, lay);  // validates
  if (ld < k) throw std::invalid_argument("pack_blocked_f32: row stride " + std::to_string(ld) + " < K " + std::to_string(k));
  const std::int64_t NB = ceil_div(n, lay.bn), KB = ceil_div(k, lay.bk), bs = lay.bn * lay.bk;
  const Transpose8 t8 = pick_transpose();
  // one task per n-block (all its k-blocks: a bn-row band of W, read once)
  ThreadPool::global(threads).run(static_cast<std::size_t>(NB), [&](std::size_t t) {
    const std::int64_t nb = static_cast<std::int64_t>(t), n0 = nb * lay.bn, nv = std::min(lay.bn, n - n0);
    for (std::int64_t kb = 0; kb < KB; ++kb) {
      const std::int64_t k0 = kb * lay.bk, kv = std::min(lay.bk, k - k0);
      float* d = dst + (lay.outer_n_major ? nb * KB + kb : kb * NB + nb) * bs;
      const float* s = src + n0 * ld + k0;
      if (lay.n_fastest)
        block_n_fastest(d, s, ld, nv, kv, lay.bn, lay.bk, t8);
      else
        block_k_fastest(d, s, ld, nv, kv, lay.bn, lay.bk);
    }
  });
}

}  // namespace k2sys
