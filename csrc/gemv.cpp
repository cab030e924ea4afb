#include "gemv.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define K2SYS_X86 1
#else
#define K2SYS_X86 0
#endif

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

// a . b over n floats with 8 partial sums, which the compiler keeps in vector registers (portable code).
float dot8(const float* a, const float* b, std::int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[j + l] * b[j + l];
  float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

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

// 4 rows at a time, two accumulators per row (8 independent FMA chains); x's chunk is loaded once
// per 4 rows.
__attribute__((target("avx2,fma"))) void rows_avx2(float* y, const float* w, const float* x, const float* bias,
                                                   std::int64_t rows, std::int64_t cols, std::int64_t ldw) {
  const std::int64_t c16 = cols & ~std::int64_t(15);
  std::int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    const float* a0 = w + r * ldw;
    const float* a1 = a0 + ldw;
    const float* a2 = a1 + ldw;
    const float* a3 = a2 + ldw;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps(), t2 = _mm256_setzero_ps(), t3 = _mm256_setzero_ps();
    std::int64_t j = 0;
    for (; j < c16; j += 16) {
      const __m256 xa = _mm256_loadu_ps(x + j), xb = _mm256_loadu_ps(x + j + 8);
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + j), xa, s0);
      t0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + j + 8), xb, t0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + j), xa, s1);
      t1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + j + 8), xb, t1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + j), xa, s2);
      t2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + j + 8), xb, t2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + j), xa, s3);
      t3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + j + 8), xb, t3);
    }
    float v0 = hsum256(_mm256_add_ps(s0, t0)), v1 = hsum256(_mm256_add_ps(s1, t1));
    float v2 = hsum256(_mm256_add_ps(s2, t2)), v3 = hsum256(_mm256_add_ps(s3, t3));
    for (; j < cols; ++j) {
      v0 += a0[j] * x[j];
      v1 += a1[j] * x[j];
      v2 += a2[j] * x[j];
      v3 += a3[j] * x[j];
    }
    if (bias) {
      v0 += bias[r];
      v1 += bias[r + 1];
      v2 += bias[r + 2];
      v3 += bias[r + 3];
    }
    y[r] = v0;
    y[r + 1] = v1;
    y[r + 2] = v2;
    y[r + 3] = v3;
  }
  if (r < rows) rows_generic(y + r, w + r * ldw, x, bias ? bias + r : nullptr, rows - r, cols, ldw);
}
#endif

RowsFn pick() {
#if K2SYS_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return rows_avx2;
#endif
  return rows_generic;
}

RowsFn kernel() {
  static const RowsFn fn = pick();
  return fn;
}

// How many tasks to split `rows` rows of `row_bytes` into for `threads` threads (multiple of 4 rows).
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

const char* gemv_isa() { return kernel() == rows_generic ? "generic" : "avx2_fma"; }

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
  });
}

void moe_pairs_f32(float* out, const float* x, const float* w13, const float* w2, const std::int64_t* ids,
                   const float* weights, std::int64_t T, std::int64_t k, std::int64_t D, std::int64_t I,
                   std::int64_t stride13, std::int64_t stride2, std::int64_t num_experts, int threads) {
  if (T < 0 || k <= 0 || D <= 0 || I <= 0) throw std::invalid_argument("moe_pairs_f32: bad shape");
  const std::int64_t P = T * k;
  for (std::int64_t p = 0; p < P; ++p)
    if (ids[p] >= num_experts) throw std::invalid_argument("moe_pairs_f32: expert id out of range");
  const RowsFn fn = kernel();
  std::vector<float> h(static_cast<std::size_t>(P * 2 * I)), a(static_cast<std::size_t>(P * I)),
      y(static_cast<std::size_t>(P * D));
  // Work items: (pair, row range) of the gate|up GEMVs, then of the down GEMVs; >= kMinTaskBytes each.
  const std::int64_t up_parts = std::max<std::int64_t>(1, split(2 * I, D * 4, threads));
  const std::int64_t dn_parts = std::max<std::int64_t>(1, split(D, I * 4, threads));
  auto run = [&](std::int64_t n, const auto& body) {
    if (threads <= 1 || n <= 1) {
      for (std::int64_t i = 0; i < n; ++i) body(i);
    } else {
      ThreadPool::global(threads).run(static_cast<std::size_t>(n), [&](std::size_t i) { body(static_cast<std::int64_t>(i)); });
    }
  };
  const std::int64_t up_per = ((2 * I + up_parts - 1) / up_parts + 3) & ~std::int64_t(3);
  run(P * up_parts, [&](std::int64_t item) {
    const std::int64_t p = item / up_parts, part = item % up_parts, e = ids[p];
    if (e < 0) return;
    const std::int64_t r0 = part * up_per, r1 = std::min(2 * I, r0 + up_per);
    if (r0 < r1) fn(h.data() + p * 2 * I + r0, w13 + e * stride13 + r0 * D, x + (p / k) * D, nullptr, r1 - r0, D, D);
  });
  for (std::int64_t p = 0; p < P; ++p) {
    if (ids[p] < 0) continue;
    const float* g = h.data() + p * 2 * I;
    float* ap = a.data() + p * I;
    for (std::int64_t i = 0; i < I; ++i) ap[i] = silu(g[i]) * g[I + i];
  }
  const std::int64_t dn_per = ((D + dn_parts - 1) / dn_parts + 3) & ~std::int64_t(3);
  run(P * dn_parts, [&](std::int64_t item) {
    const std::int64_t p = item / dn_parts, part = item % dn_parts, e = ids[p];
    if (e < 0) return;
    const std::int64_t r0 = part * dn_per, r1 = std::min(D, r0 + dn_per);
    if (r0 < r1) fn(y.data() + p * D + r0, w2 + e * stride2 + r0 * I, a.data() + p * I, nullptr, r1 - r0, I, I);
  });
  for (std::int64_t t = 0; t < T; ++t) {
    float* o = out + t * D;
    std::fill(o, o + D, 0.0f);
    for (std::int64_t j = 0; j < k; ++j) {
      const std::int64_t p = t * k + j;
      if (ids[p] < 0) continue;
      const float wt = weights[p];
      const float* yp = y.data() + p * D;
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
  const std::int64_t W = C + R;
  const RowsFn gemv = kernel();
  auto head = [&](std::int64_t h) {
    std::vector<float> q_lat(C, 0.0f), s(ctx_len), o_lat(C, 0.0f);
    const float* qn = q_nope + h * qs;
    const float* wk = w_uk + h * uks;
    for (std::int64_t n = 0; n < N; ++n) {  // q_lat += q_nope[n] * w_uk[n, :]
      const float a = qn[n];
      const float* row = wk + n * C;
      for (std::int64_t c = 0; c < C; ++c) q_lat[c] += a * row[c];
    }
    const float* qr = q_rope + h * rs;
    float mx = -std::numeric_limits<float>::infinity();
    for (std::int64_t l = 0; l < ctx_len; ++l) {
      const float* kv = cache + (blocks[l / block_size] * block_size + l % block_size) * W;
      s[l] = scale * (dot8(q_lat.data(), kv, C) + dot8(qr, kv + C, R));
      mx = std::max(mx, s[l]);
    }
    float z = 0.0f;
    for (std::int64_t l = 0; l < ctx_len; ++l) {
      s[l] = std::exp(s[l] - mx);
      z += s[l];
    }
    const float inv = 1.0f / z;
    for (std::int64_t l = 0; l < ctx_len; ++l) {  // o_lat += p[l] * kv[l, :C]
      const float p = s[l] * inv;
      const float* kv = cache + (blocks[l / block_size] * block_size + l % block_size) * W;
      for (std::int64_t c = 0; c < C; ++c) o_lat[c] += p * kv[c];
    }
    gemv(o + h * V, w_uv + h * uvs, o_lat.data(), nullptr, V, C, C);
  };
  if (threads > 1 && H > 1 && ctx_len * W * 4 >= kMinTaskBytes) {
    ThreadPool::global(threads).run(static_cast<std::size_t>(H), [&](std::size_t h) { head(static_cast<std::int64_t>(h)); });
  } else {
    for (std::int64_t h = 0; h < H; ++h) head(h);
  }
}

}  // namespace k2sys
