#include "strided_copy.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.h"

namespace k2sys {

std::uint64_t strided_rows_bytes(const StridedRow* rows, std::size_t n) {
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const StridedRow& r = rows[i];
    if (r.run_bytes < 0 || r.n[0] < 0 || r.n[1] < 0 || r.n[2] < 0)
      throw std::invalid_argument("batched_strided_copy: row " + std::to_string(i) + " has a negative size");
    const std::uint64_t bytes = static_cast<std::uint64_t>(r.run_bytes) * r.n[0] * r.n[1] * r.n[2];
    if (bytes && (!r.dst || !r.src))
      throw std::invalid_argument("batched_strided_copy: row " + std::to_string(i) + " has a null address");
    total += bytes;
  }
  return total;
}

void batched_strided_copy(const StridedRow* rows, std::size_t n, int threads, std::int64_t chunk_bytes) {
  const std::uint64_t total = strided_rows_bytes(rows, n);
  if (total == 0) return;
  ThreadPool& pool = ThreadPool::global(threads);
  std::uint64_t chunk = chunk_bytes > 0 ? static_cast<std::uint64_t>(chunk_bytes)
                                        : std::clamp<std::uint64_t>(total / (pool.size() * 4), 256 << 10, 16 << 20);
  // A task is a range of consecutive runs of one row (a run is never split unless it alone
  // exceeds the chunk, then it is cut into byte pieces), so per-row index math stays simple.
  struct Task {
    std::size_t row;
    std::uint64_t run_begin, run_end;   // runs [begin, end)
    std::uint64_t byte_begin, byte_end;  // within a single run when run_end == run_begin + 1
  };
  std::vector<Task> tasks;
  for (std::size_t i = 0; i < n; ++i) {
    const StridedRow& r = rows[i];
    const std::uint64_t runs = static_cast<std::uint64_t>(r.n[0]) * r.n[1] * r.n[2];
    const std::uint64_t rb = static_cast<std::uint64_t>(r.run_bytes);
    if (runs == 0 || rb == 0) continue;
    if (rb >= chunk) {
      for (std::uint64_t k = 0; k < runs; ++k)
        for (std::uint64_t off = 0; off < rb; off += chunk) tasks.push_back({i, k, k + 1, off, std::min(rb, off + chunk)});
    } else {
      const std::uint64_t per = std::max<std::uint64_t>(1, chunk / rb);
      for (std::uint64_t k = 0; k < runs; k += per) tasks.push_back({i, k, std::min(runs, k + per), 0, rb});
    }
  }
  auto body = [&](std::size_t t) {
    const Task& k = tasks[t];
    const StridedRow& r = rows[k.row];
    const std::uint64_t n1 = r.n[1], n2 = r.n[2];
    for (std::uint64_t run = k.run_begin; run < k.run_end; ++run) {
      const std::uint64_t i2 = run % n2, i1 = (run / n2) % n1, i0 = run / (n1 * n2);
      const std::int64_t doff = i0 * r.dst_s[0] + i1 * r.dst_s[1] + i2 * r.dst_s[2];
      const std::int64_t soff = i0 * r.src_s[0] + i1 * r.src_s[1] + i2 * r.src_s[2];
      std::memcpy(reinterpret_cast<char*>(r.dst + doff) + k.byte_begin,
                  reinterpret_cast<const char*>(r.src + soff) + k.byte_begin, k.byte_end - k.byte_begin);
    }
  };
  if (total < (1u << 20)) {
    for (std::size_t t = 0; t < tasks.size(); ++t) body(t);
  } else {
    pool.run(tasks.size(), body);
  }
}

}  // namespace k2sys
