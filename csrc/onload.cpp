#include "onload.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "stream_copy.h"

namespace k2sys {

void* AlignedHostAlloc::allocate(std::size_t nbytes, std::size_t alignment) {
  void* p = nullptr;
  if (posix_memalign(&p, std::max<std::size_t>(alignment, sizeof(void*)), nbytes) != 0) throw std::bad_alloc();
  // Touch every page now (and keep the zeros): the staging buffer is reused, so paying the
  // faults once here keeps them out of every later update.
  std::memset(p, 0, nbytes);
  return p;
}

void AlignedHostAlloc::release(void* p) { std::free(p); }

CpuOnloader::CpuOnloader(std::size_t chunk_bytes, int ring, int threads) : chunk_(chunk_bytes), pool_(4096) {
  if (chunk_ == 0) chunk_ = 16 << 20;
  chunk_ = (chunk_ + 4095) / 4096 * 4096;
  if (ring < 1) throw std::invalid_argument("CpuOnloader: ring must be >= 1");
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  for (int i = 0; i < ring; ++i) {
    slots_.push_back(pool_.acquire(chunk_));
    free_slots_.push_back(i);
  }
  for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

CpuOnloader::~CpuOnloader() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  cv_slot_.notify_all();
  for (auto& t : workers_) t.join();
  for (void* s : slots_) pool_.release(s);
}

std::uint64_t CpuOnloader::submit(void* dst, const void* src, std::size_t nbytes, bool src_pinned) {
  std::lock_guard<std::mutex> g(mu_);
  const std::uint64_t t = next_ticket_++;
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  std::size_t n = 0;
  for (std::size_t off = 0; off < nbytes; off += chunk_, ++n)
    queue_.push_back({t, d + off, s + off, std::min(chunk_, nbytes - off), !src_pinned});
  pending_.emplace_back(t, n);
  if (n == 0) {
    // An empty job completes as soon as everything before it has.
    while (!pending_.empty() && pending_.front().second == 0) {
      completed_below_ = pending_.front().first + 1;
      pending_.pop_front();
    }
    cv_done_.notify_all();
  }
  cv_work_.notify_all();
  return t;
}

void CpuOnloader::worker_loop() {
  for (;;) {
    Chunk c;
    int slot = -1;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      c = queue_.front();
      queue_.pop_front();
      if (c.staged) {
        cv_slot_.wait(lk, [&] { return stop_ || !free_slots_.empty(); });
        if (stop_) return;
        slot = free_slots_.back();
        free_slots_.pop_back();
      }
    }
    if (c.staged) {
      // Bounce through the slot: the pageable-source path of the CUDA ring, on the CPU.
      std::memcpy(slots_[slot], c.src, c.len);  // the slot is read right back: keep it cached
      copy_bytes(c.dst, slots_[slot], c.len);
    } else {
      copy_bytes(c.dst, c.src, c.len);
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      if (slot >= 0) {
        free_slots_.push_back(slot);
        cv_slot_.notify_one();
      }
      for (auto& p : pending_)
        if (p.first == c.ticket) {
          --p.second;
          break;
        }
      // Tickets complete in order (like events recorded on one stream).
      while (!pending_.empty() && pending_.front().second == 0) {
        completed_below_ = pending_.front().first + 1;
        pending_.pop_front();
      }
    }
    cv_done_.notify_all();
  }
}

bool CpuOnloader::done(std::uint64_t ticket) {
  std::lock_guard<std::mutex> g(mu_);
  return ticket < completed_below_;
}

void CpuOnloader::wait(std::uint64_t ticket) {
  std::unique_lock<std::mutex> lk(mu_);
  if (ticket >= next_ticket_) throw std::invalid_argument("CpuOnloader.wait: unknown ticket " + std::to_string(ticket));
  cv_done_.wait(lk, [&] { return ticket < completed_below_; });
}

void CpuOnloader::synchronize() {
  std::unique_lock<std::mutex> lk(mu_);
  const std::uint64_t last = next_ticket_ - 1;
  cv_done_.wait(lk, [&] { return last < completed_below_; });
}

}  // namespace k2sys
