// The whole decoder stack of a decode step in one call (fp32, CPU): the native engine's fast path
// for in-order decode tokens of a small batch (k2sys/engine/core/model_runner.py).
//
// At batch 1 a step is ~100 small ops per 8 layers; run from Python each costs a dispatch of a few
// microseconds (about a third of k2-small's step on the CI machine, measured), while the bytes the
// step must read take ~3 ms. This runs the same math as ModelRunner's per-op path with the kernels
// of gemv.h, layer after layer, with no Python in between:
//   h = rms(x, in_norm); a = attn_in h (+ b) = [q_in | latent | k_rope]
//   q = q_b rms(a_q, q_norm) (q_lora) or a_q; per head q = [q_nope | rope(q_rope)]
//   cache[slot] = [rms(latent, kv_norm) | rope(k_rope)]
//   x += o_proj mla_decode(q, cache, blocks, ctx_len) (+ b)
//   h = rms(x, post_norm); x += dense SwiGLU(h)  or  routed experts(h, router top-k) + shared SwiGLU(h)
// RoPE: out = [x1 cos - x2 sin | x2 cos + x1 sin] with (x1, x2) = (even, odd) lanes when interleaved,
// else (first half, second half) - the half-split output order k2sys.models.rope uses for q and k.
#pragma once
#include <cstdint>
#include <vector>

namespace k2sys {

// One layer's weights (addresses of fp32 row-major matrices with contiguous rows) and shapes.
struct DecodeLayer {
  std::int64_t D = 0, H = 0, N = 0, R = 0, C = 0, V = 0;
  std::int64_t q_in = 0;       // rows of attn_in's query part: q_lora_rank, or H * (N + R) without q_lora
  bool q_lora = false;         // q = q_b rms(q_a) (else q = the query part itself)
  bool interleave = true;      // RoPE pairs (even, odd) lanes (else the two halves)
  float eps = 1e-6f, q_eps = 1e-6f, kv_eps = 1e-6f, scale = 1.0f;
  std::uintptr_t in_norm = 0, post_norm = 0;
  std::uintptr_t attn_in = 0, attn_in_bias = 0;  // [q_in + C + R, D]
  std::uintptr_t q_norm = 0, q_b = 0;            // [q_in], [H * (N + R), q_in]
  std::uintptr_t kv_norm = 0;                    // [C]
  std::uintptr_t w_uk = 0, w_uv = 0;             // head h: [N, C] / [V, C] at h * uk_stride / h * uv_stride
  std::int64_t uk_stride = 0, uv_stride = 0;
  std::uintptr_t o_proj = 0, o_bias = 0;         // [D, H * V]
  std::uintptr_t cache = 0;                      // this layer's latent cache [num_blocks, block_size, C + R]
  std::int64_t num_blocks = 0;
  bool moe = false;
  std::uintptr_t gate_up = 0, down = 0;          // dense MLP, or the shared experts (inter = 0: none)
  std::int64_t inter = 0;                        // [2 * inter, D], [D, inter]
  std::uintptr_t router = 0, router_bias = 0;    // [E, D], [E] (bias may be 0)
  std::uintptr_t w13 = 0, w2 = 0;                // [E, 2I, D], [E, D, I]; expert strides in elements
  std::int64_t E = 0, I = 0, stride13 = 0, stride2 = 0, top_k = 0, n_group = 1, topk_group = 1;
  float routed_scale = 1.0f;
  bool norm_topk = true;
};

// Runs `layers` in order on the residual x [D] (in place) for one token at cache slot `slot`
// (flat row index into every layer's cache) that attends over ctx_len cached rows (this token's
// included) through blocks[ceil(ctx_len / block_size)]; cos / sin: its position's [R / 2] rows.
void decode_layers_f32(const std::vector<const DecodeLayer*>& layers, float* x, const float* cos, const float* sin,
                       std::int64_t slot, const std::int64_t* blocks, std::int64_t block_size, std::int64_t ctx_len,
                       int threads);

// The same for B in-order decode tokens of different sequences, layer by layer (each layer runs for
// every token while its weights are still in cache; a token's math is exactly decode_layers_f32's):
// token b's residual is x + b * x_stride, its RoPE rows cos_table / sin_table + positions[b] *
// rope_stride, its cache slot slots[b], its block table blocks + b * blocks_stride, its context
// ctx_lens[b]. Every layer and token is checked before any is computed.
void decode_tokens_f32(const std::vector<const DecodeLayer*>& layers, float* x, std::int64_t B, std::int64_t x_stride,
                       const float* cos_table, const float* sin_table, std::int64_t rope_stride,
                       const std::int64_t* positions, const std::int64_t* slots, const std::int64_t* blocks,
                       std::int64_t blocks_stride, std::int64_t block_size, const std::int64_t* ctx_lens,
                       int threads);

}  // namespace k2sys
