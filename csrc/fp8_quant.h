// FP8 e4m3fn block quantization (the DeepSeek-V3 / Kimi-K2 release format) on the CPU.
//
// For a weight w [rows, cols] and blocks of br x bc elements (partial blocks at the edges):
//   amax[I, J]      = max |w[i, j]| over block (I, J), in fp32
//   scale_inv[I, J] = amax / 448 (fp32 division); 1 when that is 0 (an all-zero block, or an
//                     amax so small that amax / 448 underflows)
//   q[i, j]         = e4m3fn(clamp(w[i, j] / scale_inv[i / br, j / bc], -448, 448))
// with a round-to-nearest-even fp32 -> e4m3fn conversion (subnormals kept), so that
//   w[i, j] ~= float(q[i, j]) * scale_inv[i / br, j / bc].
// Results are bit-identical to torch's `(w.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn)`.
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys {

constexpr float kFp8E4m3Max = 448.0f;

enum class QuantSrc : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// fp32 -> e4m3fn byte: round to nearest, ties to even; subnormal results kept (step 2^-9);
// |x| >= 448 (and +-inf) saturate to +-448; NaN -> 0x7f with x's sign.
std::uint8_t fp32_to_e4m3fn(float x);
// e4m3fn byte -> fp32 (exact; 0x7f / 0xff -> NaN).
float e4m3fn_to_fp32(std::uint8_t b);

// One tensor of a bucket: C-contiguous source [rows, cols] and its outputs
// q [rows, cols] (uint8 bits of e4m3fn) and scale_inv [ceil(rows/br), ceil(cols/bc)] (fp32).
struct Fp8QuantJob {
  const void* src;
  QuantSrc dtype;
  std::int64_t rows, cols;
  std::uint8_t* q;
  float* scale_inv;
};

// Quantizes every job, the blocks of all jobs spread over the process thread pool (threads <= 0:
// all hardware threads). Returns -1 on success, else the index of the first job (lowest index)
// that holds a NaN or an infinity; that job's outputs are then unspecified (others are complete).
// Throws std::invalid_argument for bad sizes or null pointers.
std::int64_t quantize_fp8_blocks(const Fp8QuantJob* jobs, std::size_t n, std::int64_t block_rows,
                                 std::int64_t block_cols, int threads);

}  // namespace k2sys
