#include "fp8_quant.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.h"

// Built with -ffp-contract=off (the rounding steps below rely on each fp32 operation rounding on
// its own) and -fno-trapping-math (so the branch-free selects vectorize); see CMakeLists.txt.

namespace k2sys {
namespace {

inline std::uint32_t f32_bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
}

inline float bits_f32(std::uint32_t b) {
  float x;
  std::memcpy(&x, &b, 4);
  return x;
}

// fp32 bit patterns of the e4m3fn range limits.
constexpr std::uint32_t kMaxBits = 0x43E00000u;       // 448.0f
constexpr std::uint32_t kMinNormalBits = 121u << 23;  // 2^-6, the smallest normal e4m3fn
constexpr std::uint32_t kInfBits = 0x7F800000u;

// e4m3fn of a finite fp32 with |x| <= 448 (the caller clamps), branch-free so loops vectorize.
//  normal results (|x| >= 2^-6): rebias the exponent (127 -> 7) and round the 23-bit mantissa
//    to 3 bits, ties to even, on the integer bits; a carry out of the mantissa bumps the exponent,
//    which is the correctly rounded result (|x| <= 448 keeps it <= 0x7E).
//  subnormal results (|x| < 2^-6): the code is round(|x| / 2^-9) in [0, 8] (8 = 0x08 is 2^-6,
//    the smallest normal); |x| * 512 is exact and adding then subtracting 2^23 rounds it to an
//    integer in the fp32 unit's round-to-nearest-even mode.
inline std::uint8_t encode_clamped(float x) {
  const std::uint32_t b = f32_bits(x);
  const std::uint32_t sign = (b >> 24) & 0x80u;
  const std::uint32_t a = b & 0x7FFFFFFFu;
  const std::uint32_t r = a - (120u << 23);
  const std::uint32_t normal = (r + 0x7FFFFu + ((r >> 20) & 1u)) >> 20;
  const float scaled = bits_f32(a) * 512.0f;
  const std::uint32_t sub = static_cast<std::uint32_t>(static_cast<std::int32_t>((scaled + 8388608.0f) - 8388608.0f));
  return static_cast<std::uint8_t>(sign | (a < kMinNormalBits ? sub : normal));
}

// fp16 -> fp32 of a finite half (exact), branch-free: normal halves shift their exponent and
// mantissa into place and rebias (15 -> 127); subnormal ones are mantissa * 2^-24.
inline float finite_half_to_f32(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t a = h & 0x7FFFu;
  const std::uint32_t normal = (a << 13) + (112u << 23);
  const std::uint32_t sub = f32_bits(static_cast<float>(a) * 5.9604644775390625e-8f);
  return bits_f32(sign | (a >= 0x0400u ? normal : sub));
}

// Source dtypes: `key` is a monotone integer image of |x| for finite x (so the block amax is an
// integer max that vectorizes), `nonfinite` the smallest key of an inf/NaN.
struct SrcF32 {
  using T = std::uint32_t;
  static constexpr std::uint32_t nonfinite = kInfBits;
  static T key(T v) { return v & 0x7FFFFFFFu; }
  static float key_value(std::uint32_t k) { return bits_f32(k); }
  static float value(T v) { return bits_f32(v); }
};
struct SrcBF16 {
  using T = std::uint16_t;
  static constexpr std::uint32_t nonfinite = 0x7F80u;
  static T key(T v) { return static_cast<T>(v & 0x7FFFu); }
  static float key_value(std::uint32_t k) { return bits_f32(k << 16); }
  static float value(T v) { return bits_f32(static_cast<std::uint32_t>(v) << 16); }
};
struct SrcF16 {
  using T = std::uint16_t;
  static constexpr std::uint32_t nonfinite = 0x7C00u;
  static T key(T v) { return static_cast<T>(v & 0x7FFFu); }
  static float key_value(std::uint32_t k) { return finite_half_to_f32(static_cast<std::uint16_t>(k)); }
  static float value(T v) { return finite_half_to_f32(v); }
};

// Blocks of one task at most (its per-block amax and scale live on the stack).
constexpr std::int64_t kMaxTaskBlocks = 64;

struct Task {
  std::uint32_t job;
  std::int64_t block_row, col_begin, col_end;  // block columns [col_begin, col_end)
};

// One task = a run of blocks along a block row, walked row by row (each row's slice is one
// contiguous run, so reads stream): pass 1 takes every block's amax, pass 2 quantizes while the
// slice is still in cache. The per-dtype entry points are compiled twice (AVX2 and baseline
// x86-64) and the loader picks the one the CPU runs. Returns false when a block holds a NaN/inf.
template <class S>
inline __attribute__((always_inline)) bool run_task(const Fp8QuantJob& j, const Task& t, std::int64_t br,
                                                    std::int64_t bc) {
  using T = typename S::T;
  const auto* src = static_cast<const T*>(j.src);
  const std::int64_t r0 = t.block_row * br, nr = std::min(br, j.rows - r0);
  const std::int64_t c0 = t.col_begin * bc, c1 = std::min(j.cols, t.col_end * bc);
  const std::int64_t nb = t.col_end - t.col_begin, nbc = (j.cols + bc - 1) / bc;
  std::uint32_t keys[kMaxTaskBlocks] = {};
  float scales[kMaxTaskBlocks];
  for (std::int64_t r = 0; r < nr; ++r) {
    const T* row = src + (r0 + r) * j.cols;
    for (std::int64_t b = 0; b < nb; ++b) {
      const std::int64_t lo = c0 + b * bc, hi = std::min(c1, lo + bc);
      T m = static_cast<T>(keys[b]);  // keys in the source width: 16-bit maxes for bf16/fp16
      for (std::int64_t c = lo; c < hi; ++c) {
        const T k = S::key(row[c]);
        m = k > m ? k : m;
      }
      keys[b] = m;
    }
  }
  for (std::int64_t b = 0; b < nb; ++b) {
    if (keys[b] >= S::nonfinite) return false;
    float s = S::key_value(keys[b]) / kFp8E4m3Max;
    if (s == 0.0f) s = 1.0f;  // all zeros (or amax / 448 underflows): q = round(w) = 0
    scales[b] = s;
    j.scale_inv[t.block_row * nbc + t.col_begin + b] = s;
  }
  for (std::int64_t r = 0; r < nr; ++r) {
    const T* row = src + (r0 + r) * j.cols;
    std::uint8_t* out = j.q + (r0 + r) * j.cols;
    for (std::int64_t b = 0; b < nb; ++b) {
      const std::int64_t lo = c0 + b * bc, hi = std::min(c1, lo + bc);
      const float s = scales[b];
      for (std::int64_t c = lo; c < hi; ++c) {
        float v = S::value(row[c]) / s;
        v = std::min(std::max(v, -kFp8E4m3Max), kFp8E4m3Max);
        out[c] = encode_clamped(v);
      }
    }
  }
  return true;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define K2SYS_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define K2SYS_CLONES
#endif

K2SYS_CLONES bool task_f32(const Fp8QuantJob& j, const Task& t, std::int64_t br, std::int64_t bc) {
  return run_task<SrcF32>(j, t, br, bc);
}
K2SYS_CLONES bool task_bf16(const Fp8QuantJob& j, const Task& t, std::int64_t br, std::int64_t bc) {
  return run_task<SrcBF16>(j, t, br, bc);
}
K2SYS_CLONES bool task_f16(const Fp8QuantJob& j, const Task& t, std::int64_t br, std::int64_t bc) {
  return run_task<SrcF16>(j, t, br, bc);
}

// About this many elements per task: enough to amortize the pool's per-task lock, small enough
// that a bucket of a few tensors still spreads over every thread.
constexpr std::int64_t kTaskElems = 1 << 18;
// Below this many elements in the whole call, the pool's wake-up costs more than it saves.
constexpr std::int64_t kSerialBelow = 1 << 16;

}  // namespace

std::uint8_t fp32_to_e4m3fn(float x) {
  const std::uint32_t b = f32_bits(x);
  const std::uint32_t sign = (b >> 24) & 0x80u;
  const std::uint32_t a = b & 0x7FFFFFFFu;
  if (a > kInfBits) return static_cast<std::uint8_t>(sign | 0x7Fu);  // NaN
  if (a >= kMaxBits) return static_cast<std::uint8_t>(sign | 0x7Eu);  // saturate to +-448
  return encode_clamped(x);
}

float e4m3fn_to_fp32(std::uint8_t b) {
  const float sign = (b & 0x80u) ? -1.0f : 1.0f;
  const int e = (b >> 3) & 0xF, m = b & 0x7;
  if (e == 0xF && m == 0x7) return bits_f32(0x7FC00000u);
  if (e == 0) return sign * static_cast<float>(m) * 0.001953125f;  // m * 2^-9
  return sign * bits_f32(static_cast<std::uint32_t>(e + 120) << 23 | static_cast<std::uint32_t>(m) << 20);
}

std::int64_t quantize_fp8_blocks(const Fp8QuantJob* jobs, std::size_t n, std::int64_t block_rows,
                                 std::int64_t block_cols, int threads) {
  if (block_rows <= 0 || block_cols <= 0)
    throw std::invalid_argument("quantize_fp8_blocks: block sizes must be > 0, got " + std::to_string(block_rows) +
                                "x" + std::to_string(block_cols));
  std::vector<Task> tasks;
  std::int64_t total = 0;
  const std::int64_t blocks_per_task = std::clamp<std::int64_t>(kTaskElems / (block_rows * block_cols), 1, kMaxTaskBlocks);
  for (std::size_t i = 0; i < n; ++i) {
    const Fp8QuantJob& j = jobs[i];
    if (j.rows < 0 || j.cols < 0)
      throw std::invalid_argument("quantize_fp8_blocks: tensor " + std::to_string(i) + " has a negative size");
    if (j.dtype != QuantSrc::kFloat32 && j.dtype != QuantSrc::kBFloat16 && j.dtype != QuantSrc::kFloat16)
      throw std::invalid_argument("quantize_fp8_blocks: tensor " + std::to_string(i) + " has an unknown dtype code");
    if (j.rows == 0 || j.cols == 0) continue;
    if (!j.src || !j.q || !j.scale_inv)
      throw std::invalid_argument("quantize_fp8_blocks: tensor " + std::to_string(i) + " has a null address");
    const std::int64_t nbr = (j.rows + block_rows - 1) / block_rows, nbc = (j.cols + block_cols - 1) / block_cols;
    for (std::int64_t I = 0; I < nbr; ++I)
      for (std::int64_t J = 0; J < nbc; J += blocks_per_task)
        tasks.push_back({static_cast<std::uint32_t>(i), I, J, std::min(nbc, J + blocks_per_task)});
    total += j.rows * j.cols;
  }
  std::unique_ptr<std::atomic<bool>[]> bad(new std::atomic<bool>[n]);
  for (std::size_t i = 0; i < n; ++i) bad[i].store(false, std::memory_order_relaxed);
  auto body = [&](std::size_t k) {
    const Task& t = tasks[k];
    const Fp8QuantJob& j = jobs[t.job];
    if (bad[t.job].load(std::memory_order_relaxed)) return;
    bool ok;
    switch (j.dtype) {
      case QuantSrc::kFloat32: ok = task_f32(j, t, block_rows, block_cols); break;
      case QuantSrc::kBFloat16: ok = task_bf16(j, t, block_rows, block_cols); break;
      default: ok = task_f16(j, t, block_rows, block_cols); break;
    }
    if (!ok) bad[t.job].store(true, std::memory_order_relaxed);
  };
  if (total < kSerialBelow) {
    for (std::size_t k = 0; k < tasks.size(); ++k) body(k);
  } else {
    ThreadPool::global(threads).run(tasks.size(), body);
  }
  for (std::size_t i = 0; i < n; ++i)
    if (bad[i].load(std::memory_order_relaxed)) return static_cast<std::int64_t>(i);
  return -1;
}

}  // namespace k2sys
