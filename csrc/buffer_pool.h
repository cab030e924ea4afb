// A pool of aligned host buffers reused across weight updates. Fresh memory costs a page
// fault per 4 KiB (docs/FACTS.md: a copy into fresh memory runs at a quarter of the bound), so
// the checkpoint engine leases staging buffers from here and hands them back.
//
// Templated on the allocator so the CPU module uses aligned+pre-touched pages and the CUDA
// module uses cudaHostAlloc with the same bookkeeping. Buffers are binned by capacity
// (a power of two >= the request, at least 64 KiB) so lease sizes that vary a little between
// updates still hit the cache.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace k2sys {

struct PoolStats {
  std::uint64_t bytes_cached = 0, bytes_leased = 0, allocations = 0, reuses = 0;
};

template <class Alloc>
class BufferPool {
 public:
  explicit BufferPool(std::size_t alignment) : alignment_(alignment) {
    if (alignment == 0 || (alignment & (alignment - 1)))
      throw std::invalid_argument("BufferPool: alignment must be a power of two, got " + std::to_string(alignment));
  }
  ~BufferPool() {
    for (auto& kv : free_)
      for (void* p : kv.second) Alloc::release(p);
    for (auto& kv : leased_) Alloc::release(kv.first);
  }
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  static std::size_t capacity_for(std::size_t nbytes) {
    std::size_t cap = 64 << 10;
    while (cap < nbytes) cap <<= 1;
    return cap;
  }

  // Returns a buffer of at least nbytes (its capacity via capacity_of).
  void* acquire(std::size_t nbytes) {
    const std::size_t cap = capacity_for(nbytes);
    std::lock_guard<std::mutex> g(mu_);
    void* p = nullptr;
    auto it = free_.find(cap);
    if (it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      stats_.bytes_cached -= cap;
      ++stats_.reuses;
    } else {
      p = Alloc::allocate(cap, alignment_);
      ++stats_.allocations;
    }
    leased_[p] = cap;
    stats_.bytes_leased += cap;
    return p;
  }

  void release(void* p) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = leased_.find(p);
    if (it == leased_.end()) throw std::invalid_argument("BufferPool.release: address was not leased from this pool");
    free_[it->second].push_back(p);
    stats_.bytes_cached += it->second;
    stats_.bytes_leased -= it->second;
    leased_.erase(it);
  }

  std::size_t capacity_of(void* p) {
    std::lock_guard<std::mutex> g(mu_);
    auto it = leased_.find(p);
    if (it == leased_.end()) throw std::invalid_argument("BufferPool.capacity_of: address was not leased from this pool");
    return it->second;
  }

  // Frees every cached (not leased) buffer.
  void trim() {
    std::lock_guard<std::mutex> g(mu_);
    for (auto& kv : free_)
      for (void* p : kv.second) Alloc::release(p);
    free_.clear();
    stats_.bytes_cached = 0;
  }

  PoolStats stats() {
    std::lock_guard<std::mutex> g(mu_);
    return stats_;
  }
  std::size_t alignment() const { return alignment_; }

 private:
  std::size_t alignment_;
  std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
  std::unordered_map<void*, std::size_t> leased_;
  PoolStats stats_;
};

// CPU allocator: aligned, and every page touched once so the first real copy does not fault.
struct AlignedHostAlloc {
  static void* allocate(std::size_t nbytes, std::size_t alignment);
  static void release(void* p);
};

using HostPool = BufferPool<AlignedHostAlloc>;

}  // namespace k2sys
