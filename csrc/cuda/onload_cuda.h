// CUDA pieces of the checkpoint engine beyond the skeleton's blocking ring:
//   PinnedPool     cudaHostAlloc buffers with the CPU pool's bookkeeping (csrc/buffer_pool.h)
//   H2DOnloader    async H2D with tickets; the same API as k2sys::CpuOnloader (csrc/onload.h)
//   batched_strided_copy_d2d   every row of a reshard plan (csrc/strided_copy.h) in one launch
//   crc32c_device  crc32c of a device buffer: per-segment crcs on the GPU, folded on the host
#pragma once
#include <cuda_runtime.h>

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "buffer_pool.h"
#include "strided_copy.h"

namespace k2sys::cuda {

struct PinnedHostAlloc {
  static void* allocate(std::size_t nbytes, std::size_t alignment);  // cudaHostAlloc pages are 4 KiB aligned
  static void release(void* p);
};
using PinnedPool = k2sys::BufferPool<PinnedHostAlloc>;

class H2DOnloader {
 public:
  H2DOnloader(int device, std::size_t chunk_bytes, int ring);
  ~H2DOnloader();
  H2DOnloader(const H2DOnloader&) = delete;
  H2DOnloader& operator=(const H2DOnloader&) = delete;

  std::uint64_t submit(void* dst, const void* src, std::size_t nbytes, bool src_pinned);
  bool done(std::uint64_t ticket);
  void wait(std::uint64_t ticket);
  void synchronize();
  std::uintptr_t stream() const { return reinterpret_cast<std::uintptr_t>(stream_); }
  std::size_t chunk_bytes() const { return chunk_; }
  int ring() const { return static_cast<int>(slots_.size()); }

 private:
  struct Job {
    std::uint64_t ticket;
    char* dst;
    const char* src;
    std::size_t len;
    bool pinned;
  };
  void run_job(const Job& j);
  void worker_loop();

  int device_;
  std::size_t chunk_;
  cudaStream_t stream_ = nullptr;
  std::vector<void*> slots_;
  std::vector<cudaEvent_t> slot_free_;
  std::vector<bool> slot_used_;
  std::thread worker_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  std::deque<Job> queue_;
  std::deque<std::pair<std::uint64_t, cudaEvent_t>> recorded_;  // job end events, in order
  std::uint64_t next_ticket_ = 1, enqueued_below_ = 1;
  std::string error_;
  bool stop_ = false;
};

void batched_strided_copy_d2d(const k2sys::StridedRow* rows, std::size_t n, int device, std::uintptr_t stream);

std::uint32_t crc32c_device(const void* data, std::size_t nbytes, int device, std::uintptr_t stream);

}  // namespace k2sys::cuda
