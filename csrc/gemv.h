// fp32 matrix-vector products for batch-1 decode on the CPU (the native engine's torch path).
//
// A decode step at batch 1 is a chain of GEMVs over the model's weights: it is bound by how fast
// the weights stream from memory. torch's fp32 GEMV (MKL sgemv through aten::mv / aten::mm with
// one row) reads ~13-15 GB/s on one core of the CI machine and does not scale with threads, while
// a plain read of the same bytes runs at ~33 GB/s (1 thread) / ~46 GB/s (2 threads). These
// kernels stream the matrix once, row after row as one sequential stream, with four 16-wide (AVX-512F)
// or 8-wide (AVX2/FMA) accumulators per row (x stays in L1), and
// split rows over the k2sys thread pool when a matrix is large enough to pay for the wake-up.
#pragma once
#include <cstdint>

namespace k2sys {

// y[r] = sum_j w[r * ldw + j] * x[j] (+ bias[r] when bias != nullptr), r < rows, j < cols.
void gemv_f32(float* y, const float* w, const float* x, const float* bias, std::int64_t rows,
              std::int64_t cols, std::int64_t ldw, int threads);

// The routed experts of one MoE layer for T tokens with k experts each (ids/weights [T, k]):
//   out[t] = sum_j weights[t, j] * w2[e] (silu(g) * u),  [g; u] = w13[e] x[t],  e = ids[t, j]
// w13: [E, 2I, D] (gate rows then up rows), w2: [E, D, I], both row-major and contiguous per
// expert (expert strides stride13 / stride2 in elements); x, out: [T, D] contiguous; ids < 0 skip.
// The k products of a token are summed in slot order in fp32. Returns nothing; out is overwritten.
void moe_pairs_f32(float* out, const float* x, const float* w13, const float* w2, const std::int64_t* ids,
                   const float* weights, std::int64_t T, std::int64_t k, std::int64_t D, std::int64_t I,
                   std::int64_t stride13, std::int64_t stride2, std::int64_t num_experts, int threads);

// a . b over n floats (8 partial sums; portable).
float dot8(const float* a, const float* b, std::int64_t n);

// Which kernel runs: "avx512f", "avx2_fma" or "generic" (picked once from the CPU's features;
// K2SYS_GEMV_ISA=avx2_fma|generic caps it, for tests and comparisons).
const char* gemv_isa();

}  // namespace k2sys

namespace k2sys {

// y[t] = x[t] * w / sqrt(mean(x[t]^2) + eps) for t < T rows of D (x row stride ldx; y contiguous), fp32.
void rms_norm_f32(float* y, const float* x, const float* w, std::int64_t T, std::int64_t D, std::int64_t ldx,
                  float eps);

// The K2 router (noaux_tc, k2sys.models.moe.route_topk) for T tokens over E experts, fp32:
//   scores = sigmoid(logits), choice = scores + bias (bias may be null); with n_group > 1 and
//   topk_group < n_group only the topk_group groups with the largest sum of their top-2 choices stay;
//   ids = the top_k choices (descending, ties to the lower index); weights = scores[ids], divided by
//   (their sum + 1e-20) if norm, times scale. logits [T, E] with row stride ld; weights/ids [T, top_k].
void route_topk_f32(float* weights, std::int64_t* ids, const float* logits, const float* bias, std::int64_t T,
                    std::int64_t E, std::int64_t ld, int top_k, int n_group, int topk_group, float scale, bool norm);

}  // namespace k2sys

namespace k2sys {

// Absorbed MLA attention of ONE decode token over its paged latent cache, every head (fp32):
//   q_lat[h]  = sum_n q_nope[h, n] * w_uk[h, n, :]                      [C]
//   s[h, l]   = scale * (q_lat[h] . kv[l, :C] + q_rope[h] . kv[l, C:])  l < ctx_len
//   o_lat[h]  = sum_l softmax(s[h])[l] * kv[l, :C]                      [C]
//   o[h, v]   = w_uv[h, v, :] . o_lat[h]                                [V]
// kv[l] is row l % block_size of cache block blocks[l / block_size]; cache is [num_blocks, block_size,
// C + R] contiguous. Head strides (elements): q_nope / q_rope qs / rs, w_uk / w_uv uks / uvs (their rows
// are C contiguous floats). o: [H, V] contiguous. Heads run on the pool when threads > 1 and the
// context is long enough to pay for it.
void mla_decode_f32(float* o, const float* q_nope, std::int64_t qs, const float* q_rope, std::int64_t rs,
                    const float* w_uk, std::int64_t uks, const float* w_uv, std::int64_t uvs, const float* cache,
                    const std::int64_t* blocks, std::int64_t num_blocks, std::int64_t block_size,
                    std::int64_t ctx_len, std::int64_t H, std::int64_t N, std::int64_t C, std::int64_t R,
                    std::int64_t V, float scale, int threads);

}  // namespace k2sys
