// Large host copies with non-temporal (streaming) stores.
//
// glibc's memcpy streams only copies above its non-temporal threshold (3/4 of the last-level
// cache: ~190 MB on a 260 MB-L3 server), so the 1-64 MiB chunks a thread pool hands out are
// copied through the cache: every destination line is first read (read-for-ownership) and later
// evicted, ~1.5x the memory traffic of a streaming copy. Measured on the 2-core dev VM: a 1 GiB
// copy in 64 MiB chunks on 2 threads ran at 9.3 GB/s, two 512 MiB memcpys (streamed) at 14-16.
// The copied bytes are not read back soon (an onload is followed by the trainer's own access
// pattern, a staging buffer by a broadcast), so bypassing the cache loses nothing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define K2_STREAM_X86 1
#endif

namespace k2sys {

// Below this a plain memcpy wins (the data may well stay in cache for its next reader).
constexpr std::size_t kStreamCopyMin = 1 << 20;

#ifdef K2_STREAM_X86
// One full cache line per store (a 64-byte streaming store fills its write-combining buffer at once).
__attribute__((target("avx512f"))) inline void stream_copy_avx512(char* d, const char* s, std::size_t n) {
  std::size_t head = (64 - (reinterpret_cast<std::uintptr_t>(d) & 63)) & 63;  // align the stores
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  for (std::size_t blocks = n / 256; blocks; --blocks, d += 256, s += 256) {
    const __m512i a = _mm512_loadu_si512(s);
    const __m512i b = _mm512_loadu_si512(s + 64);
    const __m512i c = _mm512_loadu_si512(s + 128);
    const __m512i e = _mm512_loadu_si512(s + 192);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), a);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 64), b);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 128), c);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 192), e);
  }
  _mm_sfence();  // streaming stores are weakly ordered: visible before whoever is told "done"
  std::memcpy(d, s, n % 256);
}

__attribute__((target("avx2"))) inline void stream_copy_avx2(char* d, const char* s, std::size_t n) {
  std::size_t head = (32 - (reinterpret_cast<std::uintptr_t>(d) & 31)) & 31;
  std::memcpy(d, s, head);
  d += head;
  s += head;
  n -= head;
  for (std::size_t blocks = n / 128; blocks; --blocks, d += 128, s += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + 96), e);
  }
  _mm_sfence();
  std::memcpy(d, s, n % 128);
}

__attribute__((target("avx512f"))) inline void stream_zero_avx512(char* d, std::size_t n) {
  std::size_t head = (64 - (reinterpret_cast<std::uintptr_t>(d) & 63)) & 63;
  std::memset(d, 0, head);
  d += head;
  n -= head;
  const __m512i z = _mm512_setzero_si512();
  for (std::size_t blocks = n / 256; blocks; --blocks, d += 256) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d), z);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 64), z);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 128), z);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(d + 192), z);
  }
  _mm_sfence();
  std::memset(d, 0, n % 256);
}

inline int stream_copy_isa() {  // 2: AVX-512, 1: AVX2, 0: neither (plain memcpy)
  static const int isa = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
  return isa;
}
#endif

// Streams whatever the size (a piece of a larger copy whose destination will not be read back
// soon); memcpy where the CPU has no streaming stores.
inline void copy_bytes_streamed(void* dst, const void* src, std::size_t n) {
#ifdef K2_STREAM_X86
  switch (stream_copy_isa()) {
    case 2:
      return stream_copy_avx512(static_cast<char*>(dst), static_cast<const char*>(src), n);
    case 1:
      return stream_copy_avx2(static_cast<char*>(dst), static_cast<const char*>(src), n);
    default:
      break;
  }
#endif
  std::memcpy(dst, src, n);
}

// memcpy semantics (regions must not overlap); streams copies of kStreamCopyMin bytes and more.
inline void copy_bytes(void* dst, const void* src, std::size_t n) {
  if (n >= kStreamCopyMin) return copy_bytes_streamed(dst, src, n);
  std::memcpy(dst, src, n);
}

// memset(dst, 0, n), streamed from kStreamCopyMin bytes on (a resumed KV cache is zeroed whole).
inline void zero_bytes(void* dst, std::size_t n) {
#ifdef K2_STREAM_X86
  if (n >= kStreamCopyMin && stream_copy_isa() == 2) return stream_zero_avx512(static_cast<char*>(dst), n);
#endif
  std::memset(dst, 0, n);
}

}  // namespace k2sys
