#include "decode_layer.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "gemv.h"

namespace k2sys {
namespace {

const float* f(std::uintptr_t p) { return reinterpret_cast<const float*>(p); }

void need(std::uintptr_t p, const char* field, std::size_t layer) {
  if (!p) throw std::invalid_argument("decode_layers_f32: layer " + std::to_string(layer) + " has no " + field);
}

// RoPE of one [R] vector into out (half-split output order; see decode_layer.h).
void rope(float* out, const float* v, const float* cos, const float* sin, std::int64_t R, bool interleave) {
  const std::int64_t half = R / 2;
  for (std::int64_t i = 0; i < half; ++i) {
    const float x1 = interleave ? v[2 * i] : v[i], x2 = interleave ? v[2 * i + 1] : v[i + half];
    const float a = x1 * cos[i], b = x2 * sin[i], c = x2 * cos[i], d = x1 * sin[i];
    out[i] = a - b;
    out[half + i] = c + d;
  }
}

// y = down (silu(g) * u), [g; u] = gate_up h
void swiglu(float* y, const float* h, const float* gate_up, const float* down, std::int64_t D, std::int64_t inter,
            std::vector<float>& gu, int threads) {
  gu.resize(static_cast<std::size_t>(2 * inter));
  gemv_f32(gu.data(), gate_up, h, nullptr, 2 * inter, D, D, threads);
  for (std::int64_t i = 0; i < inter; ++i) {
    const float g = gu[i];
    gu[i] = g / (1.0f + std::exp(-g)) * gu[inter + i];
  }
  gemv_f32(y, down, gu.data(), nullptr, D, inter, inter, threads);
}

}  // namespace

namespace {

struct Scratch {
  std::vector<float> h, a, qa, q, qr, o, y, y2, gu, logits, wts;
  std::vector<std::int64_t> ids;
};

// Shapes and addresses of layer li, checked once per call (slot bounds are per token).
void check_layer(const DecodeLayer& L, std::size_t li) {
  const std::int64_t D = L.D, H = L.H, N = L.N, R = L.R, C = L.C, V = L.V, QK = N + R;
  if (D <= 0 || H <= 0 || N <= 0 || R <= 0 || R % 2 || C <= 0 || V <= 0 || L.q_in <= 0)
    throw std::invalid_argument("decode_layers_f32: layer " + std::to_string(li) + " has a bad shape");
  if (!L.q_lora && L.q_in != H * QK)
    throw std::invalid_argument("decode_layers_f32: without q_lora q_in must be H * (N + R)");
  need(L.in_norm, "in_norm", li);
  need(L.post_norm, "post_norm", li);
  need(L.attn_in, "attn_in", li);
  need(L.kv_norm, "kv_norm", li);
  need(L.w_uk, "w_uk", li);
  need(L.w_uv, "w_uv", li);
  need(L.o_proj, "o_proj", li);
  need(L.cache, "cache", li);
  if (L.q_lora) {
    need(L.q_norm, "q_norm", li);
    need(L.q_b, "q_b", li);
  }
  if (!L.moe) {
    need(L.gate_up, "gate_up", li);
    need(L.down, "down", li);
    return;
  }
  need(L.router, "router", li);
  need(L.w13, "w13", li);
  need(L.w2, "w2", li);
  if (L.E <= 0 || L.I <= 0 || L.top_k <= 0)
    throw std::invalid_argument("decode_layers_f32: layer " + std::to_string(li) + " has a bad MoE shape");
  if (L.inter > 0) {
    need(L.gate_up, "gate_up (shared experts)", li);
    need(L.down, "down (shared experts)", li);
  }
}

// One layer for one token: the residual x [D] in place.
void layer_step(const DecodeLayer& L, float* x, const float* cos, const float* sin, std::int64_t slot,
                const std::int64_t* blocks, std::int64_t block_size, std::int64_t ctx_len, int threads, Scratch& s) {
  const std::int64_t D = L.D, H = L.H, N = L.N, R = L.R, C = L.C, V = L.V, W = C + R, QK = N + R;
  auto& h = s.h; auto& a = s.a; auto& qa = s.qa; auto& q = s.q; auto& qr = s.qr; auto& o = s.o;
  auto& y = s.y; auto& y2 = s.y2; auto& gu = s.gu; auto& logits = s.logits; auto& wts = s.wts; auto& ids = s.ids;
  // ---- attention ----
  h.resize(D);
  a.resize(L.q_in + W);
  rms_norm_f32(h.data(), x, f(L.in_norm), 1, D, D, L.eps);
  gemv_f32(a.data(), f(L.attn_in), h.data(), f(L.attn_in_bias), L.q_in + W, D, D, threads);
  const float* qsrc = a.data();
  if (L.q_lora) {
    qa.resize(L.q_in);
    q.resize(H * QK);
    rms_norm_f32(qa.data(), a.data(), f(L.q_norm), 1, L.q_in, L.q_in, L.q_eps);
    gemv_f32(q.data(), f(L.q_b), qa.data(), nullptr, H * QK, L.q_in, L.q_in, threads);
    qsrc = q.data();
  }
  qr.resize(H * R);
  for (std::int64_t hd = 0; hd < H; ++hd) rope(qr.data() + hd * R, qsrc + hd * QK + N, cos, sin, R, L.interleave);
  float* row = reinterpret_cast<float*>(L.cache) + slot * W;
  rms_norm_f32(row, a.data() + L.q_in, f(L.kv_norm), 1, C, C, L.kv_eps);
  rope(row + C, a.data() + L.q_in + C, cos, sin, R, L.interleave);
  o.resize(H * V);
  mla_decode_f32(o.data(), qsrc, QK, qr.data(), R, f(L.w_uk), L.uk_stride, f(L.w_uv), L.uv_stride,
                 reinterpret_cast<const float*>(L.cache), blocks, L.num_blocks, block_size, ctx_len, H, N, C, R, V,
                 L.scale, threads);
  y.resize(D);
  gemv_f32(y.data(), f(L.o_proj), o.data(), f(L.o_bias), D, H * V, H * V, threads);
  for (std::int64_t d = 0; d < D; ++d) x[d] += y[d];
  // ---- MLP ----
  rms_norm_f32(h.data(), x, f(L.post_norm), 1, D, D, L.eps);
  if (!L.moe) {
    swiglu(y.data(), h.data(), f(L.gate_up), f(L.down), D, L.inter, gu, threads);
    for (std::int64_t d = 0; d < D; ++d) x[d] += y[d];
    return;
  }
  logits.resize(L.E);
  wts.resize(L.top_k);
  ids.resize(L.top_k);
  gemv_f32(logits.data(), f(L.router), h.data(), nullptr, L.E, D, D, threads);
  route_topk_f32(wts.data(), ids.data(), logits.data(), f(L.router_bias), 1, L.E, L.E, static_cast<int>(L.top_k),
                 static_cast<int>(L.n_group), static_cast<int>(L.topk_group), L.routed_scale, L.norm_topk);
  moe_pairs_f32(y.data(), h.data(), f(L.w13), f(L.w2), ids.data(), wts.data(), 1, L.top_k, D, L.I, L.stride13,
                L.stride2, L.E, threads);
  if (L.inter > 0) {  // out = routed + shared, then the residual (the per-op path's order)
    y2.resize(D);
    swiglu(y2.data(), h.data(), f(L.gate_up), f(L.down), D, L.inter, gu, threads);
    for (std::int64_t d = 0; d < D; ++d) y[d] += y2[d];
  }
  for (std::int64_t d = 0; d < D; ++d) x[d] += y[d];
}

}  // namespace

void decode_tokens_f32(const std::vector<const DecodeLayer*>& layers, float* x, std::int64_t B, std::int64_t x_stride,
                       const float* cos_table, const float* sin_table, std::int64_t rope_stride,
                       const std::int64_t* positions, const std::int64_t* slots, const std::int64_t* blocks,
                       std::int64_t blocks_stride, std::int64_t block_size, const std::int64_t* ctx_lens,
                       int threads) {
  if (!x || !cos_table || !sin_table || !positions || !slots || !blocks || !ctx_lens)
    throw std::invalid_argument("decode_tokens_f32: null x, rope tables, positions, slots, blocks or ctx_lens");
  if (B <= 0 || block_size <= 0 || rope_stride < 0 || blocks_stride < 0)
    throw std::invalid_argument("decode_tokens_f32: B and block_size must be > 0, strides >= 0");
  for (std::int64_t b = 0; b < B; ++b)
    if (ctx_lens[b] <= 0 || slots[b] < 0 || positions[b] < 0)
      throw std::invalid_argument("decode_tokens_f32: token " + std::to_string(b) +
                                  " needs ctx_len > 0, slot >= 0 and position >= 0");
  for (std::size_t li = 0; li < layers.size(); ++li) {
    check_layer(*layers[li], li);
    for (std::int64_t b = 0; b < B; ++b)
      if (slots[b] >= layers[li]->num_blocks * block_size)
        throw std::invalid_argument("decode_layers_f32: slot " + std::to_string(slots[b]) + " is past layer " +
                                    std::to_string(li) + "'s cache");
  }
  Scratch s;
  // layer-major: a layer's weights are read for every token while they are still in cache
  for (const DecodeLayer* L : layers)
    for (std::int64_t b = 0; b < B; ++b)
      layer_step(*L, x + b * x_stride, cos_table + positions[b] * rope_stride, sin_table + positions[b] * rope_stride,
                 slots[b], blocks + b * blocks_stride, block_size, ctx_lens[b], threads, s);
}

void decode_layers_f32(const std::vector<const DecodeLayer*>& layers, float* x, const float* cos, const float* sin,
                       std::int64_t slot, const std::int64_t* blocks, std::int64_t block_size, std::int64_t ctx_len,
                       int threads) {
  if (!x || !cos || !sin || !blocks) throw std::invalid_argument("decode_layers_f32: null x, cos, sin or blocks");
  if (block_size <= 0 || ctx_len <= 0 || slot < 0)
    throw std::invalid_argument("decode_layers_f32: block_size and ctx_len must be > 0 and slot >= 0");
  const std::int64_t pos = 0;
  decode_tokens_f32(layers, x, 1, 0, cos, sin, 0, &pos, &slot, blocks, 0, block_size, &ctx_len, threads);
}

}  // namespace k2sys