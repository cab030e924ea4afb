#include "gemv.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define K2SYS_X86 1
// Portable loops compiled once per ISA level and dispatched at load (GCC/Clang ifunc).
#define K2SYS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define K2SYS_X86 0
#define K2SYS_CLONES
#endif
// Helpers inlined into each clone (so they compile to that clone's instructions).
// rows_multi prefetches its weight stream this many floats ahead (2 KiB): with cold k2-small experts
// (512 x 512, 8 tokens) 15 -> 19 GB/s, measured; 1 KiB gave 17.5.
#define K2SYS_MULTI_PREFETCH 512

#define K2SYS_INLINE inline __attribute__((always_inline))

namespace k2sys {
namespace {

// Rows of one task when a matrix is split over threads: below this many bytes per task the pool's
// wake-up (~10 us on a VM) costs more than the rows it moves. At k2-small's batch-1 decode, 256 KiB
// took the 2-thread step from 12.6 to ~16.5 GB/s of weights read (1 MiB kept most GEMVs on one
// thread); 128 KiB measured the same as 256 KiB.
constexpr std::int64_t kMinTaskBytes = 256 << 10;

using RowsFn = void (*)(float*, const float*, const float*, const float*, std::int64_t, std::int64_t,
                        std::int64_t);

}  // namespace

namespace {

// a . b over n floats with 8 partial sums, which the compiler keeps in vector registers (portable
// code; inlined into the per-ISA clones below, where it compiles to AVX2 / AVX-512 instructions).
inline float dot8_inline(const float* a, const float* b, std::int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace

float dot8(const float* a, const float* b, std::int64_t n) { return dot8_inline(a, b, n); }

namespace {

// 16 floats as one GCC/Clang vector: each ISA clone below compiles its arithmetic to one zmm
// (AVX-512), two ymm (AVX2) or four xmm (SSE2) operations; loads and stores are unaligned.
typedef float f16v __attribute__((vector_size(64)));

K2SYS_INLINE f16v load16(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

K2SYS_INLINE void store16(float* p, f16v v) { std::memcpy(p, &v, sizeof v); }

typedef float f8v __attribute__((vector_size(32)));
typedef float f4v __attribute__((vector_size(16)));

// The 16 lanes' sum as a tree (halves, quarters, then 4 scalars): 3 vector adds instead of a
// serial chain of 15, which dominated the few-token expert products.
K2SYS_INLINE float sum16(f16v v) {
  const f8v h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f4v q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// y[:n] += a * x[:n]
K2SYS_INLINE void axpy(float* y, float a, const float* x, std::int64_t n) {
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) store16(y + j, load16(y + j) + a * load16(x + j));
  for (; j < n; ++j) y[j] += a * x[j];
}

// out[i] = q . (k[i] + off) over n floats for 4 rows at once (4 independent accumulators).
K2SYS_INLINE void dots4(float* out, const float* q, const float* const* k, std::int64_t off, std::int64_t n) {
  const float *k0 = k[0] + off, *k1 = k[1] + off, *k2 = k[2] + off, *k3 = k[3] + off;
  f16v a0 = {}, a1 = {}, a2 = {}, a3 = {};
  std::int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const f16v qv = load16(q + j);
    a0 += qv * load16(k0 + j);
    a1 += qv * load16(k1 + j);
    a2 += qv * load16(k2 + j);
    a3 += qv * load16(k3 + j);
  }
  float t[4] = {sum16(a0), sum16(a1), sum16(a2), sum16(a3)};
  for (; j < n; ++j) {
    t[0] += q[j] * k0[j];
    t[1] += q[j] * k1[j];
    t[2] += q[j] * k2[j];
    t[3] += q[j] * k3[j];
  }
  for (int i = 0; i < 4; ++i) out[i] = t[i];
}

// y[t * ldy + r] = w[r, :] . xs[t, :] for rows r in [r0, r1) and NB token rows xs (contiguous, cols
// floats each): every weight row is read once for all NB tokens (NB accumulators), which is what
// makes a few tokens per expert cost one pass over the expert's weights.
template <int NB>
K2SYS_INLINE void rows_multi_nb(float* y, std::int64_t ldy, const float* w, std::int64_t r0, std::int64_t r1,
                                std::int64_t cols, const float* xs) {
  for (std::int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * cols;
    f16v acc[NB];
    for (int t = 0; t < NB; ++t) acc[t] = f16v{};
    std::int64_t j = 0;
    for (; j + 16 <= cols; j += 16) {
      __builtin_prefetch(wr + j + K2SYS_MULTI_PREFETCH);  // the weight stream, ahead of the loads
      const f16v wv = load16(wr + j);
      for (int t = 0; t < NB; ++t) acc[t] += wv * load16(xs + t * cols + j);
    }
    for (int t = 0; t < NB; ++t) {
      float v = sum16(acc[t]);
      for (std::int64_t jj = j; jj < cols; ++jj) v += wr[jj] * xs[t * cols + jj];
      y[t * ldy + r] = v;
    }
  }
}

// rows_multi_nb over m tokens, 8 at a time (the weight rows of a block of 8 stay in L1 for the next).
K2SYS_CLONES void rows_multi(float* y, std::int64_t ldy, const float* w, std::int64_t r0, std::int64_t r1,
                             std::int64_t cols, const float* xs, std::int64_t m) {
  for (std::int64_t t0 = 0; t0 < m; t0 += 8) {
    float* yt = y + t0 * ldy;
    const float* xt = xs + t0 * cols;
    switch (std::min<std::int64_t>(8, m - t0)) {
      case 1: rows_multi_nb<1>(yt, ldy, w, r0, r1, cols, xt); break;
      case 2: rows_multi_nb<2>(yt, ldy, w, r0, r1, cols, xt); break;
      case 3: rows_multi_nb<3>(yt, ldy, w, r0, r1, cols, xt); break;
      case 4: rows_multi_nb<4>(yt, ldy, w, r0, r1, cols, xt); break;
      case 5: rows_multi_nb<5>(yt, ldy, w, r0, r1, cols, xt); break;
      case 6: rows_multi_nb<6>(yt, ldy, w, r0, r1, cols, xt); break;
      case 7: rows_multi_nb<7>(yt, ldy, w, r0, r1, cols, xt); break;
      default: rows_multi_nb<8>(yt, ldy, w, r0, r1, cols, xt); break;
    }
  }
}

}  // namespace

namespace {

// Portable kernel: one dot8 per row.
void rows_generic(float* y, const float* w, const float* x, const float* bias, std::int64_t rows,
                  std::int64_t cols, std::int64_t ldw) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float s = dot8(w + r * ldw, x, cols);
    y[r] = bias ? s + bias[r] : s;
  }
}

#if K2SYS_X86

__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One row at a time, four 8-wide accumulators: the matrix is read as ONE sequential stream, which
// the hardware prefetcher follows best (x stays in L1). On the CI machine (Zen 5, k2-small's
// batch-1 step, 121 MB over 156 matrices of 128-1536 columns) this read 28 GB/s where the former
// 4-rows-per-pass kernel read 22 GB/s (4 interleaved streams) and a plain read 33 GB/s.
__attribute__((target("avx2,fma"))) void rows_avx2(float* y, const float* w, const float* x, const float* bias,
                                                   std::int64_t rows, std::int64_t cols, std::int64_t ldw) {
  const std::int64_t c32 = cols & ~std::int64_t(31), c8 = cols & ~std::int64_t(7);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* a = w + r * ldw;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    std::int64_t j = 0;
    for (; j < c32; j += 32) {
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(x + j), s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(x + j + 8), s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(x + j + 16), s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(x + j + 24), s3);
    }
    for (; j < c8; j += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(x + j), s0);
    float v = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; j < cols; ++j) v += a[j] * x[j];
    y[r] = bias ? v + bias[r] : v;
  }
}

// The same with 16-wide accumulators (AVX-512F): 64 floats (4 cache lines) per iteration keep more
// line fills in flight from one core; 31-35 GB/s on the step above. Written with GCC vector
// extensions (f16v is one zmm here; the AVX2 build of this code ran at half the intrinsics' speed).
K2SYS_INLINE void rows_stream16(float* y, const float* w, const float* x, const float* bias, std::int64_t rows,
                                std::int64_t cols, std::int64_t ldw) {
  const std::int64_t c64 = cols & ~std::int64_t(63), c16 = cols & ~std::int64_t(15);
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* a = w + r * ldw;
    f16v s0 = {}, s1 = {}, s2 = {}, s3 = {};
    std::int64_t j = 0;
    for (; j < c64; j += 64) {
      s0 += load16(a + j) * load16(x + j);
      s1 += load16(a + j + 16) * load16(x + j + 16);
      s2 += load16(a + j + 32) * load16(x + j + 32);
      s3 += load16(a + j + 48) * load16(x + j + 48);
    }
    for (; j < c16; j += 16) s0 += load16(a + j) * load16(x + j);
    float v = sum16((s0 + s1) + (s2 + s3));
    for (; j < cols; ++j) v += a[j] * x[j];
    y[r] = bias ? v + bias[r] : v;
  }
}

__attribute__((target("avx512f"))) void rows_avx512(float* y, const float* w, const float* x, const float* bias,
                                                    std::int64_t rows, std::int64_t cols, std::int64_t ldw) {
  rows_stream16(y, w, x, bias, rows, cols, ldw);
}
#endif

RowsFn pick() {
  // K2SYS_GEMV_ISA caps the kernel (tests run every kernel the machine has; "generic" = portable).
  const char* cap = std::getenv("K2SYS_GEMV_ISA");
  const std::string want = cap ? cap : "";
  if (!want.empty() && want != "avx512f" && want != "avx2_fma" && want != "generic")
    throw std::invalid_argument("K2SYS_GEMV_ISA must be avx512f, avx2_fma or generic, got '" + want + "'");
  if (want == "generic") return rows_generic;
#if K2SYS_X86
  __builtin_cpu_init();
  if (want != "avx2_fma" && __builtin_cpu_supports("avx512f")) return rows_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_avx2;
#endif
  return rows_generic;
}

RowsFn kernel() {
  static const RowsFn fn = pick();
  return fn;
}

// How many tasks to split `rows` rows of `row_bytes` into for `threads` threads (task rows are rounded to 4).
std::int64_t split(std::int64_t rows, std::int64_t row_bytes, int threads) {
  if (threads <= 1) return 1;
  const std::int64_t by_bytes = std::max<std::int64_t>(1, rows * row_bytes / kMinTaskBytes);
  return std::max<std::int64_t>(1, std::min<std::int64_t>({by_bytes, threads, rows / 4}));
}

void check(std::int64_t rows, std::int64_t cols, std::int64_t ldw, const char* what) {
  if (rows < 0 || cols < 0) throw std::invalid_argument(std::string(what) + ": negative shape");
  if (rows > 1 && ldw < cols) throw std::invalid_argument(std::string(what) + ": row stride < columns");
}

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace

const char* gemv_isa() {
#if K2SYS_X86
  if (kernel() == rows_avx512) return "avx512f";
  if (kernel() == rows_avx2) return "avx2_fma";
#endif
  return "generic";
}

void gemv_f32(float* y, const float* w, const float* x, const float* bias, std::int64_t rows, std::int64_t cols,
              std::int64_t ldw, int threads) {
  check(rows, cols, ldw, "gemv_f32");
  if (rows == 0) return;
  const RowsFn fn = kernel();
  const std::int64_t tasks = split(rows, cols * 4, threads);
  if (tasks <= 1) {
    fn(y, w, x, bias, rows, cols, ldw);
    return;
  }
  const std::int64_t per = ((rows + tasks - 1) / tasks + 3) & ~std::int64_t(3);
  ThreadPool::global(threads).run(static_cast<std::size_t>(tasks), [&](std::size_t t) {
    const std::int64_t r0 = static_cast<std::int64_t>(t) * per, r1 = std::min(rows, r0 + per);
    if (r0 < r1) fn(y + r0, w + r0 * ldw, x, bias ? bias + r0 : nullptr, r1 - r0, cols, ldw);
  }, /*spin=*/true);
}

void moe_pairs_f32(float* out, const float* x, const float* w13, const float* w2, const std::int64_t* ids,
                   const float* weights, std::int64_t T, std::int64_t k, std::int64_t D, std::int64_t I,
                   std::int64_t stride13, std::int64_t stride2, std::int64_t num_experts, int threads) {
  if (T < 0 || k <= 0 || D <= 0 || I <= 0) throw std::invalid_argument("moe_pairs_f32: bad shape");
  const std::int64_t P = T * k;
  for (std::int64_t p = 0; p < P; ++p)
    if (ids[p] >= num_experts) throw std::invalid_argument("moe_pairs_f32: expert id out of range");
  // Pairs grouped by expert (counting sort; ids < 0 dropped): group g holds `order[start[g] ..
  // start[g + 1])`, the pairs of expert gexp[g]; q indexes that sorted order in h / a / y.
  std::vector<std::int64_t> count(static_cast<std::size_t>(num_experts), 0), order, start, gexp, slot_of(P, -1);
  for (std::int64_t p = 0; p < P; ++p)
    if (ids[p] >= 0) ++count[ids[p]];
  std::vector<std::int64_t> first(static_cast<std::size_t>(num_experts), 0);
  std::int64_t Q = 0;
  for (std::int64_t e = 0; e < num_experts; ++e) {
    first[e] = Q;
    if (count[e]) {
      start.push_back(Q);
      gexp.push_back(e);
    }
    Q += count[e];
  }
  start.push_back(Q);
  order.resize(static_cast<std::size_t>(Q));
  for (std::int64_t p = 0; p < P; ++p)
    if (ids[p] >= 0) {
      slot_of[p] = first[ids[p]]++;
      order[slot_of[p]] = p;
    }
  const std::int64_t G = static_cast<std::int64_t>(gexp.size());
  const RowsFn fn = kernel();
  // xs: each pair's token row, gathered in sorted order (several tokens per expert stream its
  // weights once through rows_multi; a lone pair is a GEMV).
  std::vector<float> xs(static_cast<std::size_t>(Q * D)), h(static_cast<std::size_t>(Q * 2 * I)),
      a(static_cast<std::size_t>(Q * I)), y(static_cast<std::size_t>(Q * D));
  for (std::int64_t q = 0; q < Q; ++q) std::memcpy(xs.data() + q * D, x + (order[q] / k) * D, sizeof(float) * D);
  // Work items: (expert group, row range) of the gate|up products, then of the down products.
  const std::int64_t up_parts = std::max<std::int64_t>(1, split(2 * I, D * 4, threads));
  const std::int64_t dn_parts = std::max<std::int64_t>(1, split(D, I * 4, threads));
  auto run = [&](std::int64_t n, const auto& body) {
    if (threads <= 1 || n <= 1) {
      for (std::int64_t i = 0; i < n; ++i) body(i);
    } else {
      ThreadPool::global(threads).run(static_cast<std::size_t>(n), [&](std::size_t i) { body(static_cast<std::int64_t>(i)); }, /*spin=*/true);
    }
  };
  auto product = [&](float* out_rows, std::int64_t ld, const float* w, std::int64_t r0, std::int64_t r1,
                     std::int64_t cols, const float* in_rows, std::int64_t m) {
    if (m == 1) {
      fn(out_rows + r0, w + r0 * cols, in_rows, nullptr, r1 - r0, cols, cols);
    } else {
      rows_multi(out_rows, ld, w, r0, r1, cols, in_rows, m);
    }
  };
  const std::int64_t up_per = ((2 * I + up_parts - 1) / up_parts + 3) & ~std::int64_t(3);
  run(G * up_parts, [&](std::int64_t item) {
    const std::int64_t g = item / up_parts, part = item % up_parts, q0 = start[g], m = start[g + 1] - q0;
    const std::int64_t r0 = part * up_per, r1 = std::min(2 * I, r0 + up_per);
    if (r0 < r1) product(h.data() + q0 * 2 * I, 2 * I, w13 + gexp[g] * stride13, r0, r1, D, xs.data() + q0 * D, m);
  });
  for (std::int64_t q = 0; q < Q; ++q) {
    const float* gp = h.data() + q * 2 * I;
    float* ap = a.data() + q * I;
    for (std::int64_t i = 0; i < I; ++i) ap[i] = silu(gp[i]) * gp[I + i];
  }
  const std::int64_t dn_per = ((D + dn_parts - 1) / dn_parts + 3) & ~std::int64_t(3);
  run(G * dn_parts, [&](std::int64_t item) {
    const std::int64_t g = item / dn_parts, part = item % dn_parts, q0 = start[g], m = start[g + 1] - q0;
    const std::int64_t r0 = part * dn_per, r1 = std::min(D, r0 + dn_per);
    if (r0 < r1) product(y.data() + q0 * D, D, w2 + gexp[g] * stride2, r0, r1, I, a.data() + q0 * I, m);
  });
  for (std::int64_t t = 0; t < T; ++t) {  // each token's k products, summed in slot order
    float* o = out + t * D;
    std::fill(o, o + D, 0.0f);
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t p = t * k + j;
      if (slot_of[p] < 0) continue;
      const float wt = weights[p];
      const float* yp = y.data() + slot_of[p] * D;
      for (std::int64_t d = 0; d < D; ++d) o[d] += wt * yp[d];
    }
  }
}

}  // namespace k2sys

namespace k2sys {

void rms_norm_f32(float* y, const float* x, const float* w, std::int64_t T, std::int64_t D, std::int64_t ldx,
                  float eps) {
  if (T < 0 || D <= 0 || (T > 1 && ldx < D)) throw std::invalid_argument("rms_norm_f32: bad shape or stride");
  for (std::int64_t t = 0; t < T; ++t) {
    const float* a = x + t * ldx;
    const float ss = dot8(a, a, D);
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
    float* o = y + t * D;
    for (std::int64_t d = 0; d < D; ++d) o[d] = (a[d] * r) * w[d];
  }
}

void route_topk_f32(float* weights, std::int64_t* ids, const float* logits, const float* bias, std::int64_t T,
                    std::int64_t E, std::int64_t ld, int top_k, int n_group, int topk_group, float scale, bool norm) {
  if (T < 0 || E <= 0 || top_k <= 0 || top_k > E || (T > 1 && ld < E))
    throw std::invalid_argument("route_topk_f32: bad shape");
  const bool grouped = n_group > 1 && topk_group < n_group;
  if (grouped && (E % n_group != 0 || topk_group <= 0))
    throw std::invalid_argument("route_topk_f32: n_group must divide the experts and topk_group must be > 0");
  const std::int64_t per = grouped ? E / n_group : E;
  if (grouped && top_k > topk_group * per)
    throw std::invalid_argument("route_topk_f32: top_k exceeds the experts of the kept groups");
  std::vector<float> s(E), c(E), gs(grouped ? n_group : 0);
  std::vector<char> taken(E), gkeep(grouped ? n_group : 0);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (std::int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * ld;
    for (std::int64_t e = 0; e < E; ++e) {
      s[e] = 1.0f / (1.0f + std::exp(-l[e]));
      c[e] = bias ? s[e] + bias[e] : s[e];
    }
    if (grouped) {
      for (int g = 0; g < n_group; ++g) {  // sum of the group's two largest choices
        float m1 = ninf, m2 = ninf;
        for (std::int64_t e = g * per; e < (g + 1) * per; ++e) {
          if (c[e] > m1) {
            m2 = m1;
            m1 = c[e];
          } else if (c[e] > m2) {
            m2 = c[e];
          }
        }
        gs[g] = per >= 2 ? m1 + m2 : m1;
        gkeep[g] = 0;
      }
      for (int r = 0; r < topk_group; ++r) {  // best groups, ties to the lower index
        int best = -1;
        for (int g = 0; g < n_group; ++g)
          if (!gkeep[g] && (best < 0 || gs[g] > gs[best])) best = g;
        gkeep[best] = 1;
      }
      for (std::int64_t e = 0; e < E; ++e)
        if (!gkeep[e / per]) c[e] = ninf;
    }
    std::fill(taken.begin(), taken.end(), 0);
    float sum = 0.0f;
    for (int j = 0; j < top_k; ++j) {  // descending choice, ties to the lower index
      std::int64_t best = -1;
      for (std::int64_t e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || c[e] > c[best])) best = e;
      taken[best] = 1;
      ids[t * top_k + j] = best;
      weights[t * top_k + j] = s[best];
      sum += s[best];
    }
    for (int j = 0; j < top_k; ++j) {
      float w = weights[t * top_k + j];
      if (norm) w = w / (sum + 1e-20f);
      weights[t * top_k + j] = w * scale;
    }
  }
}

}  // namespace k2sys

namespace k2sys {

namespace {

// One head of mla_decode_f32 (see gemv.h). Compiled once per x86 ISA level (the loops are plain C++
// that GCC vectorizes 16 / 8 / 4 wide) and picked at load by the CPU's features; on k2-small's decode
// the AVX-512 clone ran the step's 8 attention calls ~3x faster than the SSE2 baseline build.
K2SYS_CLONES void mla_head(float* o, const float* qn, const float* qr, const float* wk, const float* wv,
                           const float* cache, const std::int64_t* blocks, std::int64_t block_size,
                           std::int64_t ctx_len, std::int64_t N, std::int64_t C, std::int64_t R, std::int64_t V,
                           float scale, RowsFn gemv) {
  const std::int64_t W = C + R;
  std::vector<float> q_lat(C, 0.0f), s(ctx_len), o_lat(C, 0.0f);
  float* ql = q_lat.data();
  for (std::int64_t n = 0; n < N; ++n) axpy(ql, qn[n], wk + n * C, C);  // q_lat += q_nope[n] * w_uk[n, :]
  auto row = [&](std::int64_t l) { return cache + (blocks[l / block_size] * block_size + l % block_size) * W; };
  std::int64_t l = 0;
  for (; l + 4 <= ctx_len; l += 4) {  // 4 cache rows at a time: independent FMA chains
    const float* k4[4] = {row(l), row(l + 1), row(l + 2), row(l + 3)};
    dots4(s.data() + l, ql, k4, 0, C);
    float t[4];
    dots4(t, qr, k4, C, R);
    for (int i = 0; i < 4; ++i) s[l + i] = scale * (s[l + i] + t[i]);
  }
  for (; l < ctx_len; ++l) {
    const float* kv = row(l);
    s[l] = scale * (dot8_inline(ql, kv, C) + dot8_inline(qr, kv + C, R));
  }
  float mx = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < ctx_len; ++i) mx = std::max(mx, s[i]);
  float z = 0.0f;
  for (std::int64_t i = 0; i < ctx_len; ++i) {
    s[i] = std::exp(s[i] - mx);
    z += s[i];
  }
  const float inv = 1.0f / z;
  float* ol = o_lat.data();
  for (std::int64_t i = 0; i < ctx_len; ++i) axpy(ol, s[i] * inv, row(i), C);  // o_lat += p[i] * kv[i, :C]
  gemv(o, wv, ol, nullptr, V, C, C);
}

}  // namespace

void mla_decode_f32(float* o, const float* q_nope, std::int64_t qs, const float* q_rope, std::int64_t rs,
                    const float* w_uk, std::int64_t uks, const float* w_uv, std::int64_t uvs, const float* cache,
                    const std::int64_t* blocks, std::int64_t num_blocks, std::int64_t block_size,
                    std::int64_t ctx_len, std::int64_t H, std::int64_t N, std::int64_t C, std::int64_t R,
                    std::int64_t V, float scale, int threads) {
  if (H <= 0 || N <= 0 || C <= 0 || R < 0 || V <= 0 || block_size <= 0 || ctx_len <= 0)
    throw std::invalid_argument("mla_decode_f32: bad shape or empty context");
  const std::int64_t nb = (ctx_len + block_size - 1) / block_size;
  for (std::int64_t b = 0; b < nb; ++b)
    if (blocks[b] < 0 || blocks[b] >= num_blocks) throw std::invalid_argument("mla_decode_f32: block id out of range");
  const RowsFn gemv = kernel();
  auto head = [&](std::int64_t h) {
    mla_head(o + h * V, q_nope + h * qs, q_rope + h * rs, w_uk + h * uks, w_uv + h * uvs, cache, blocks, block_size,
             ctx_len, N, C, R, V, scale, gemv);
  };
  if (threads > 1 && H > 1 && ctx_len * (C + R) * 4 >= kMinTaskBytes) {
    ThreadPool::global(threads).run(static_cast<std::size_t>(H), [&](std::size_t h) { head(static_cast<std::int64_t>(h)); }, /*spin=*/true);
  } else {
    for (std::int64_t h = 0; h < H; ++h) head(h);
  }
}

}  // namespace k2sys
