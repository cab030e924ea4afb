#include "strided_copy.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "crc32c.h"
#include "stream_copy.h"
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

namespace {
// In the fused verify-and-apply, rows whose destination is large (>= kStreamCopyMin bytes in all)
// in runs of >= 1 KiB are copied with streaming stores: those bytes are not read back soon (an
// update's target) and through the cache every destination line would first be read for
// ownership, ~1.5x the memory traffic. Smaller rows stay in cache for whoever reads them next.
bool stream_row(const StridedRow& r) {
  const std::uint64_t total = static_cast<std::uint64_t>(r.run_bytes) * r.n[0] * r.n[1] * r.n[2];
  return total >= kStreamCopyMin && r.run_bytes >= 1024;
}
}  // namespace

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

bool batched_strided_copy_crc(const StridedRow* rows, std::size_t n, int threads, std::int64_t chunk_bytes,
                              std::uintptr_t base, std::uint64_t len, bool crc_source, std::uint32_t* crc_out) {
  strided_rows_bytes(rows, n);  // validates
  const std::uint64_t chunk = chunk_bytes > 0 ? static_cast<std::uint64_t>(chunk_bytes) : (256u << 10);
  // A piece: runs [run_begin, run_end) of one row, or bytes [byte_begin, byte_end) of one run; its
  // side in the region is the interval [lo, lo + bytes).
  struct Piece {
    std::size_t row;
    std::uint64_t run_begin, run_end, byte_begin, byte_end;
    std::uint64_t lo, bytes;
    std::uint32_t crc;
  };
  std::vector<Piece> pieces;
  for (std::size_t i = 0; i < n; ++i) {
    const StridedRow& r = rows[i];
    const std::uint64_t rb = static_cast<std::uint64_t>(r.run_bytes);
    const std::uint64_t runs = static_cast<std::uint64_t>(r.n[0]) * r.n[1] * r.n[2];
    if (runs == 0 || rb == 0) continue;
    const std::int64_t* st = crc_source ? r.src_s : r.dst_s;
    const std::int64_t start = crc_source ? r.src : r.dst;
    // packed strides: run k of the row sits at start + k * run_bytes on the hashed side
    if ((r.n[2] > 1 && st[2] != r.run_bytes) || (r.n[1] > 1 && st[1] != r.n[2] * r.run_bytes) ||
        (r.n[0] > 1 && st[0] != r.n[1] * r.n[2] * r.run_bytes))
      return false;
    const std::uint64_t lo = static_cast<std::uint64_t>(start);
    if (lo < base || lo - base > len || runs * rb > len - (lo - base)) return false;
    if (rb >= chunk) {
      for (std::uint64_t k = 0; k < runs; ++k)
        for (std::uint64_t off = 0; off < rb; off += chunk) {
          const std::uint64_t end = std::min(rb, off + chunk);
          pieces.push_back({i, k, k + 1, off, end, lo + k * rb + off, end - off, 0});
        }
    } else {
      const std::uint64_t per = std::max<std::uint64_t>(1, chunk / rb);
      for (std::uint64_t k = 0; k < runs; k += per) {
        const std::uint64_t e = std::min(runs, k + per);
        pieces.push_back({i, k, e, 0, rb, lo + k * rb, (e - k) * rb, 0});
      }
    }
  }
  std::sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.lo < b.lo; });
  for (std::size_t t = 1; t < pieces.size(); ++t)
    if (pieces[t - 1].lo + pieces[t - 1].bytes > pieces[t].lo) return false;  // overlapping reads/writes
  // region bytes between pieces (padding, entries no row reads) are hashed as pieces of their own
  struct Gap {
    std::uint64_t lo, bytes;
    std::uint32_t crc;
  };
  std::vector<Gap> gaps;
  std::uint64_t at = base;
  for (const Piece& p : pieces) {
    if (p.lo > at) gaps.push_back({at, p.lo - at, 0});
    at = p.lo + p.bytes;
  }
  if (base + len > at) gaps.push_back({at, base + len - at, 0});
  const std::size_t np = pieces.size();
  auto body = [&](std::size_t t) {
    if (t >= np) {
      Gap& g = gaps[t - np];
      g.crc = crc32c(0, reinterpret_cast<const void*>(g.lo), g.bytes);
      return;
    }
    Piece& k = pieces[t];
    const StridedRow& r = rows[k.row];
    if (crc_source) k.crc = crc32c(0, reinterpret_cast<const void*>(k.lo), k.bytes);
    const std::uint64_t n1 = r.n[1], n2 = r.n[2];
    // a pack is hashed right after (its destination must stay in cache): stream only when verifying
    const bool stream = crc_source && stream_row(r);
    for (std::uint64_t run = k.run_begin; run < k.run_end; ++run) {
      const std::uint64_t i2 = run % n2, i1 = (run / n2) % n1, i0 = run / (n1 * n2);
      const std::int64_t doff = i0 * r.dst_s[0] + i1 * r.dst_s[1] + i2 * r.dst_s[2];
      const std::int64_t soff = i0 * r.src_s[0] + i1 * r.src_s[1] + i2 * r.src_s[2];
      char* d = reinterpret_cast<char*>(r.dst + doff) + k.byte_begin;
      const char* src = reinterpret_cast<const char*>(r.src + soff) + k.byte_begin;
      if (stream) {
        copy_bytes_streamed(d, src, k.byte_end - k.byte_begin);
      } else {
        std::memcpy(d, src, k.byte_end - k.byte_begin);
      }
    }
    if (!crc_source) k.crc = crc32c(0, reinterpret_cast<const void*>(k.lo), k.bytes);
  };
  const std::size_t tasks = np + gaps.size();
  if (len < (1u << 20)) {
    for (std::size_t t = 0; t < tasks; ++t) body(t);
  } else {
    ThreadPool::global(threads).run(tasks, body);
  }
  // fold the pieces and gaps in region order
  std::uint32_t c = 0;
  std::size_t gi = 0;
  for (std::size_t t = 0; t <= np; ++t) {
    const std::uint64_t upto = t < np ? pieces[t].lo : base + len;
    while (gi < gaps.size() && gaps[gi].lo < upto) {
      c = crc32c_combine(c, gaps[gi].crc, gaps[gi].bytes);
      ++gi;
    }
    if (t < np) c = crc32c_combine(c, pieces[t].crc, pieces[t].bytes);
  }
  *crc_out = c;
  return true;
}

}  // namespace k2sys
