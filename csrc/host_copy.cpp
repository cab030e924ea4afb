#include "host_copy.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "stream_copy.h"
#include "thread_pool.h"

namespace k2sys {
namespace {

constexpr std::size_t kPage = 4096;
// Below this a single memcpy beats waking the pool.
constexpr std::size_t kSerialBelow = 1 << 20;

std::size_t pick_chunk(std::size_t nbytes, int threads, std::int64_t chunk_bytes) {
  std::size_t chunk;
  if (chunk_bytes > 0) {
    chunk = static_cast<std::size_t>(chunk_bytes);
  } else {
    // ~4 chunks per thread balances stragglers; never below 1 MiB, never above 64 MiB.
    chunk = nbytes / (static_cast<std::size_t>(std::max(threads, 1)) * 4);
    chunk = std::clamp<std::size_t>(chunk, 1 << 20, 64 << 20);
  }
  return (chunk + kPage - 1) / kPage * kPage;
}

}  // namespace

void parallel_copy(void* dst, const void* src, std::size_t nbytes, int threads, std::int64_t chunk_bytes) {
  if (nbytes == 0) return;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  ThreadPool& pool = ThreadPool::global(threads);
  if (nbytes < kSerialBelow || pool.size() == 1) {
    copy_bytes(d, s, nbytes);
    return;
  }
  const std::size_t chunk = pick_chunk(nbytes, pool.size(), chunk_bytes);
  const std::size_t n_chunks = (nbytes + chunk - 1) / chunk;
  pool.run(n_chunks, [&](std::size_t i) {
    const std::size_t off = i * chunk;
    copy_bytes(d + off, s + off, std::min(chunk, nbytes - off));
  });
}

void batched_copy(const std::uint64_t* dst_ptrs, const std::uint64_t* src_ptrs, const std::uint64_t* sizes,
                  std::size_t n, int threads, std::int64_t chunk_bytes) {
  struct Piece {
    char* dst;
    const char* src;
    std::size_t len;
  };
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) total += sizes[i];
  if (total == 0) return;
  ThreadPool& pool = ThreadPool::global(threads);
  const std::size_t chunk = pick_chunk(total, pool.size(), chunk_bytes);
  // Tasks are runs of pieces holding ~chunk bytes each.
  std::vector<Piece> pieces;
  std::vector<std::size_t> task_start{0};
  std::size_t acc = 0;
  for (std::size_t i = 0; i < n; ++i) {
    auto* d = reinterpret_cast<char*>(dst_ptrs[i]);
    const auto* s = reinterpret_cast<const char*>(src_ptrs[i]);
    std::size_t left = sizes[i], off = 0;
    while (left > 0) {
      const std::size_t take = std::min(left, chunk - acc);
      pieces.push_back({d + off, s + off, take});
      off += take;
      left -= take;
      acc += take;
      if (acc == chunk) {
        task_start.push_back(pieces.size());
        acc = 0;
      }
    }
  }
  if (task_start.back() != pieces.size()) task_start.push_back(pieces.size());
  const std::size_t n_tasks = task_start.size() - 1;
  auto body = [&](std::size_t t) {
    for (std::size_t p = task_start[t]; p < task_start[t + 1]; ++p) copy_bytes(pieces[p].dst, pieces[p].src, pieces[p].len);
  };
  if (total < kSerialBelow) {
    for (std::size_t t = 0; t < n_tasks; ++t) body(t);
  } else {
    pool.run(n_tasks, body);
  }
}

void batched_zero(const std::uint64_t* dst_ptrs, const std::uint64_t* sizes, std::size_t n, int threads) {
  struct Piece {
    char* dst;
    std::size_t len;
  };
  std::size_t total = 0;
  for (std::size_t i = 0; i < n; ++i) total += sizes[i];
  if (total == 0) return;
  ThreadPool& pool = ThreadPool::global(threads);
  const std::size_t chunk = pick_chunk(total, pool.size(), 0);
  std::vector<Piece> pieces;
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t off = 0; off < sizes[i]; off += chunk)
      pieces.push_back({reinterpret_cast<char*>(dst_ptrs[i]) + off, std::min(chunk, sizes[i] - off)});
  auto body = [&](std::size_t t) { zero_bytes(pieces[t].dst, pieces[t].len); };
  if (total < kSerialBelow || pool.size() == 1) {
    for (std::size_t t = 0; t < pieces.size(); ++t) body(t);
  } else {
    pool.run(pieces.size(), body);
  }
}

}  // namespace k2sys
