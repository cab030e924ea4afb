#include "crc32c.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#include <nmmintrin.h>
#define K2_CRC_X86 1
#endif

#include "thread_pool.h"

namespace k2sys {
namespace {

constexpr std::uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Tables {
  std::uint32_t t[8][256];
  Tables() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
      t[0][i] = c;
    }
    // t[k][i]: crc of byte i followed by k zero bytes; lets 8 bytes be folded per step.
    for (std::uint32_t i = 0; i < 256; ++i)
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFF];
  }
};

const Tables& tables() {
  static const Tables tb;
  return tb;
}

// Raw (no pre/post inversion) register updates.
std::uint32_t update_table(std::uint32_t c, const unsigned char* p, std::size_t n) {
  const Tables& tb = tables();
  while (n && (reinterpret_cast<std::uintptr_t>(p) & 7)) {
    c = (c >> 8) ^ tb.t[0][(c ^ *p++) & 0xFF];
    --n;
  }
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);  // little-endian host assumed (x86-64, aarch64)
    w ^= c;
    c = tb.t[7][w & 0xFF] ^ tb.t[6][(w >> 8) & 0xFF] ^ tb.t[5][(w >> 16) & 0xFF] ^ tb.t[4][(w >> 24) & 0xFF] ^
        tb.t[3][(w >> 32) & 0xFF] ^ tb.t[2][(w >> 40) & 0xFF] ^ tb.t[1][(w >> 48) & 0xFF] ^ tb.t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ tb.t[0][(c ^ *p++) & 0xFF];
  return c;
}

#ifdef K2_CRC_X86
__attribute__((target("sse4.2"))) std::uint32_t update_hw_serial(std::uint32_t c, const unsigned char* p,
                                                                  std::size_t n) {
  while (n && (reinterpret_cast<std::uintptr_t>(p) & 7)) {
    c = _mm_crc32_u8(c, *p++);
    --n;
  }
  std::uint64_t c64 = c;
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
    p += 8;
    n -= 8;
  }
  c = static_cast<std::uint32_t>(c64);
  while (n--) c = _mm_crc32_u8(c, *p++);
  return c;
}
#endif

bool hw_supported() {
#ifdef K2_CRC_X86
  static const bool ok = __builtin_cpu_supports("sse4.2");
  return ok;
#else
  return false;
#endif
}

// GF(2) polynomial arithmetic modulo the CRC polynomial, reflected bit order (bit 31 = x^0).
std::uint32_t multmodp(std::uint32_t a, std::uint32_t b) {
  std::uint32_t m = 1u << 31, p = 0;
  for (;;) {
    if (a & m) {
      p ^= b;
      if ((a & (m - 1)) == 0) break;
    }
    m >>= 1;
    b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
  }
  return p;
}

// x^(2^k) mod P for k in [0, 64).
const std::array<std::uint32_t, 64>& x2n_table() {
  static const std::array<std::uint32_t, 64> tb = [] {
    std::array<std::uint32_t, 64> t{};
    std::uint32_t p = 1u << 30;  // x^1
    for (auto& e : t) {
      e = p;
      p = multmodp(p, p);
    }
    return t;
  }();
  return tb;
}

constexpr std::size_t kMinChunk = 1 << 20;

std::uint32_t zeros_op(std::uint64_t len) {
  // x^(8*len) mod P, built from the x^(2^k) table: len bytes = len * 2^3 bits.
  std::uint32_t p = 1u << 31;  // x^0
  unsigned k = 3;
  for (std::uint64_t n = len; n; n >>= 1, ++k)
    if (n & 1) p = multmodp(x2n_table()[k & 63], p);
  return p;
}

// The raw crc register advanced over `len` zero bytes: multiplication by x^(8*len) mod P, a linear
// map, tabulated per byte of the register so one shift costs four lookups.
struct ShiftTable {
  std::uint32_t t[4][256];
  explicit ShiftTable(std::size_t len) {
    const std::uint32_t op = zeros_op(len);
    for (int k = 0; k < 4; ++k)
      for (std::uint32_t v = 0; v < 256; ++v) t[k][v] = multmodp(op, v << (8 * k));
  }
  std::uint32_t operator()(std::uint32_t c) const {
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24];
  }
};

#ifdef K2_CRC_X86
// Three independent crc32 streams over consecutive blocks, folded with the shift tables: the
// crc32 instruction has a latency of 3 cycles and a throughput of 1, so one stream runs at a third
// of what the unit can do (a dependent chain). Raw registers: reg(A|B|C, c) = S(S(reg(A, c)) ^
// reg(B, 0)) ^ reg(C, 0) with S the shift over one block.
template <std::size_t kBlock>
__attribute__((target("sse4.2"))) std::uint32_t three_way(std::uint32_t c, const unsigned char*& p,
                                                           std::size_t& n, const ShiftTable& shift) {
  while (n >= 3 * kBlock) {
    std::uint64_t c0 = c, c1 = 0, c2 = 0;
    for (std::size_t i = 0; i < kBlock; i += 8) {
      std::uint64_t w0, w1, w2;
      std::memcpy(&w0, p + i, 8);
      std::memcpy(&w1, p + kBlock + i, 8);
      std::memcpy(&w2, p + 2 * kBlock + i, 8);
      c0 = _mm_crc32_u64(c0, w0);
      c1 = _mm_crc32_u64(c1, w1);
      c2 = _mm_crc32_u64(c2, w2);
    }
    c = shift(shift(static_cast<std::uint32_t>(c0)) ^ static_cast<std::uint32_t>(c1)) ^ static_cast<std::uint32_t>(c2);
    p += 3 * kBlock;
    n -= 3 * kBlock;
  }
  return c;
}

// Carry-less multiplication folding (AVX-512 VPCLMULQDQ): four 64-byte accumulators over 256-byte
// strides, folded forward with x^k mod P and reduced to 16 bytes, which the crc32 instruction hashes.
// Reflected bit order: a 64-bit lane holds x^63..x^0 from bit 0 up, and a clmul of two such lanes is
// their product times x, so folding 16 bytes [L | H] forward by D bits multiplies L by x^(64+D-1) mod P
// and H by x^(D-1) mod P (each < x^32), giving a value < x^96 that is xored onto the block D bits on.
// The folded 16 bytes are congruent to the data mod P, so they have the same crc register. ~2-3x the
// three-stream crc32 loop on data in cache (measured on the dev VM's EPYC, see tests/test_ext.py).
std::uint32_t xpow_mod(std::uint64_t e) {  // x^e mod P
  std::uint32_t p = 1u << 31;  // x^0
  for (unsigned k = 0; e; e >>= 1, ++k)
    if (e & 1) p = multmodp(x2n_table()[k & 63], p);
  return p;
}

struct FoldKeys {  // per fold distance D: {x^(64+D-1), x^(D-1)} mod P as 64-bit reflected lanes
  std::uint64_t d2048[2], d512[2], d384[2], d256[2], d128[2];
  FoldKeys() {
    auto set = [](std::uint64_t* k, std::uint64_t d) {
      k[0] = static_cast<std::uint64_t>(xpow_mod(64 + d - 1)) << 32;
      k[1] = static_cast<std::uint64_t>(xpow_mod(d - 1)) << 32;
    };
    set(d2048, 2048);
    set(d512, 512);
    set(d384, 384);
    set(d256, 256);
    set(d128, 128);
  }
};

const FoldKeys& fold_keys() {
  static const FoldKeys k;
  return k;
}

bool clmul_supported() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("vpclmulqdq") &&
                         __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.2");
  return ok;
}

constexpr std::size_t kClmulMin = 512;  // below this the crc32 loop wins (fold setup and reduction)

#define K2_CLMUL_TARGET __attribute__((target("avx512f,vpclmulqdq,pclmul,sse4.2")))
K2_CLMUL_TARGET inline __m512i fold512(__m512i z, __m512i k) {
  return _mm512_xor_si512(_mm512_clmulepi64_epi128(z, k, 0x00), _mm512_clmulepi64_epi128(z, k, 0x11));
}
K2_CLMUL_TARGET inline __m128i fold128(__m128i x, __m128i k) {
  return _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11));
}
K2_CLMUL_TARGET inline __m128i keys128(const std::uint64_t* k) {
  return _mm_set_epi64x(static_cast<long long>(k[1]), static_cast<long long>(k[0]));
}
K2_CLMUL_TARGET inline __m512i keys512(const std::uint64_t* k) { return _mm512_broadcast_i32x4(keys128(k)); }

K2_CLMUL_TARGET std::uint32_t update_clmul(std::uint32_t c, const unsigned char* p, std::size_t n) {
  const FoldKeys& K = fold_keys();
  // the register enters as the first 4 bytes xored (reflected init)
  __m512i z0 = _mm512_xor_si512(_mm512_loadu_si512(p), _mm512_castsi128_si512(_mm_cvtsi32_si128(static_cast<int>(c))));
  __m512i z1 = _mm512_loadu_si512(p + 64), z2 = _mm512_loadu_si512(p + 128), z3 = _mm512_loadu_si512(p + 192);
  p += 256;
  n -= 256;
  const __m512i k2048 = keys512(K.d2048);
  while (n >= 256) {
    z0 = _mm512_xor_si512(fold512(z0, k2048), _mm512_loadu_si512(p));
    z1 = _mm512_xor_si512(fold512(z1, k2048), _mm512_loadu_si512(p + 64));
    z2 = _mm512_xor_si512(fold512(z2, k2048), _mm512_loadu_si512(p + 128));
    z3 = _mm512_xor_si512(fold512(z3, k2048), _mm512_loadu_si512(p + 192));
    p += 256;
    n -= 256;
  }
  const __m512i k512 = keys512(K.d512);
  z1 = _mm512_xor_si512(z1, fold512(z0, k512));
  z2 = _mm512_xor_si512(z2, fold512(z1, k512));
  z3 = _mm512_xor_si512(z3, fold512(z2, k512));
  // four 16-byte lanes of the last 64 bytes -> one
  __m128i x = _mm512_extracti32x4_epi32(z3, 3);
  x = _mm_xor_si128(x, fold128(_mm512_extracti32x4_epi32(z3, 0), keys128(K.d384)));
  x = _mm_xor_si128(x, fold128(_mm512_extracti32x4_epi32(z3, 1), keys128(K.d256)));
  x = _mm_xor_si128(x, fold128(_mm512_extracti32x4_epi32(z3, 2), keys128(K.d128)));
  const __m128i k128 = keys128(K.d128);
  while (n >= 16) {
    x = _mm_xor_si128(fold128(x, k128), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    p += 16;
    n -= 16;
  }
  std::uint64_t r = _mm_crc32_u64(0, static_cast<std::uint64_t>(_mm_cvtsi128_si64(x)));
  r = _mm_crc32_u64(r, static_cast<std::uint64_t>(_mm_extract_epi64(x, 1)));
  return update_hw_serial(static_cast<std::uint32_t>(r), p, n);
}

std::uint32_t update_hw(std::uint32_t c, const unsigned char* p, std::size_t n) {
  if (n >= kClmulMin && clmul_supported()) return update_clmul(c, p, n);
  static const ShiftTable long_shift(8192), short_shift(256);
  while (n && (reinterpret_cast<std::uintptr_t>(p) & 7)) {  // align the 8-byte reads
    c = update_hw_serial(c, p, 1);
    ++p;
    --n;
  }
  c = three_way<8192>(c, p, n, long_shift);
  c = three_way<256>(c, p, n, short_shift);
  return update_hw_serial(c, p, n);
}
#endif


}  // namespace

bool crc32c_hw_available() { return hw_supported(); }

std::uint32_t crc32c(std::uint32_t crc, const void* data, std::size_t n, CrcImpl impl) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t c = ~crc;
  if (impl == CrcImpl::kHardware && !hw_supported())
    throw std::runtime_error("crc32c: the hardware path needs SSE4.2, which this CPU lacks; use impl='table'");
#ifdef K2_CRC_X86
  if (impl != CrcImpl::kTable && hw_supported()) return ~update_hw(c, p, n);
#endif
  return ~update_table(c, p, n);
}

std::uint32_t crc32c_zeros_op(std::uint64_t len) { return zeros_op(len); }

std::uint32_t crc32c_shift(std::uint32_t op, std::uint32_t crc) { return multmodp(op, crc); }

std::uint32_t crc32c_combine(std::uint32_t crc_a, std::uint32_t crc_b, std::uint64_t len_b) {
  return multmodp(crc32c_zeros_op(len_b), crc_a) ^ crc_b;
}

void crc32c_batched(const std::uint64_t* ptrs, const std::uint64_t* sizes, std::size_t n, std::uint32_t* out,
                    int threads, CrcImpl impl) {
  ThreadPool& pool = ThreadPool::global(threads);
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) total += sizes[i];
  // Chunks give every thread a few tasks; equal lengths inside a buffer keep the fold cheap.
  std::size_t chunk = std::max<std::size_t>(kMinChunk, total / (static_cast<std::size_t>(pool.size()) * 4 + 1));
  chunk = (chunk + 4095) / 4096 * 4096;
  struct Task {
    std::size_t buf, off, len;
  };
  std::vector<Task> tasks;
  std::vector<std::size_t> first(n + 1, 0);
  for (std::size_t i = 0; i < n; ++i) {
    first[i] = tasks.size();
    for (std::size_t off = 0; off < sizes[i]; off += chunk) tasks.push_back({i, off, std::min(chunk, sizes[i] - off)});
  }
  first[n] = tasks.size();
  std::vector<std::uint32_t> part(tasks.size());
  pool.run(tasks.size(), [&](std::size_t t) {
    const Task& k = tasks[t];
    part[t] = crc32c(0, reinterpret_cast<const unsigned char*>(ptrs[k.buf]) + k.off, k.len, impl);
  });
  const std::uint32_t op = crc32c_zeros_op(chunk);
  for (std::size_t i = 0; i < n; ++i) {
    std::uint32_t c = 0;  // crc of the empty string
    for (std::size_t t = first[i]; t < first[i + 1]; ++t)
      c = (tasks[t].len == chunk ? crc32c_shift(op, c) : crc32c_shift(crc32c_zeros_op(tasks[t].len), c)) ^ part[t];
    out[i] = c;
  }
}

}  // namespace k2sys
