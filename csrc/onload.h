// CPU pipelined onload: the same API and semantics as the CUDA H2D ring (csrc/cuda/staging.h),
// so the checkpoint engine runs one code path on both.
//
//   submit(dst, src, nbytes, src_pinned) -> ticket   enqueue; returns at once (a CUDA async copy)
//   done(ticket) / wait(ticket) / synchronize()       like cudaEventQuery / EventSynchronize
//
// Jobs run in submission order on dedicated worker threads (not the global pool, so an
// onload overlaps the pool's apply/checksum work). A job is cut into chunks; a "pinned"
// source (memory from the staging pool) is copied straight to dst, a pageable source goes
// through a ring of `ring` staging slots of chunk_bytes, like the CUDA path's pinned bounce
// buffers: at most `ring` chunks are in flight, which bounds staging memory.
#pragma once
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "buffer_pool.h"

namespace k2sys {

class CpuOnloader {
 public:
  CpuOnloader(std::size_t chunk_bytes, int ring, int threads);
  ~CpuOnloader();
  CpuOnloader(const CpuOnloader&) = delete;
  CpuOnloader& operator=(const CpuOnloader&) = delete;

  std::uint64_t submit(void* dst, const void* src, std::size_t nbytes, bool src_pinned);
  bool done(std::uint64_t ticket);
  void wait(std::uint64_t ticket);
  void synchronize();

  std::size_t chunk_bytes() const { return chunk_; }
  int ring() const { return static_cast<int>(slots_.size()); }
  int threads() const { return static_cast<int>(workers_.size()); }

 private:
  struct Chunk {
    std::uint64_t ticket;
    char* dst;
    const char* src;
    std::size_t len;
    bool staged;
  };
  void worker_loop();

  std::size_t chunk_;
  HostPool pool_;
  std::vector<void*> slots_;
  std::vector<int> free_slots_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_, cv_slot_;
  std::deque<Chunk> queue_;
  std::deque<std::pair<std::uint64_t, std::size_t>> pending_;  // (ticket, chunks left), in order
  std::uint64_t next_ticket_ = 1, completed_below_ = 1;          // tickets < completed_below_ are done
  bool stop_ = false;
};

}  // namespace k2sys
