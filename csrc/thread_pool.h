// A fixed-size worker pool for byte-moving jobs (host copies, slice copies, checksums) and the
// decode kernels' row splits. One pool per process, created lazily.
//
// Waking a sleeping worker costs ~10 us on a VM (futex), about a whole k2-small GEMV at batch-1
// decode, where jobs come back to back: a job run with spin = true (the decode kernels) has its
// workers spin for kSpinMicros on the job counter after it before they sleep, and its caller spin
// for the last task (OpenMP's spin-then-block wait, bounded). Byte-moving jobs do not spin: they
// are long, and spinning would take cores from another process's ranks (2-rank update on 2 cores).
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace k2sys {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }  // + the calling thread

  // Runs fn(task_index) for task_index in [0, num_tasks) on the pool and the caller; blocks
  // until all are done. The first exception thrown by a task is rethrown in the caller.
  void run(std::size_t num_tasks, const std::function<void(std::size_t)>& fn, bool spin = false);

  // The process-wide pool of that size (threads <= 0: hardware concurrency); pools are never
  // destroyed, so a reference stays valid while other threads ask for other sizes.
  static ThreadPool& global(int threads);

  static constexpr int kSpinMicros = 100;  // how long a spin = true job's workers wait busily

 private:
  void worker_loop();
  void drain(const std::function<void(std::size_t)>* fn);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(std::size_t)>* job_ = nullptr;
  std::size_t num_tasks_ = 0, next_task_ = 0;
  std::atomic<std::size_t> done_tasks_{0};
  std::atomic<std::size_t> generation_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> spin_{false};  // the last job asked its workers to spin for the next one
  std::exception_ptr error_;
  std::mutex run_mu_;  // one job on the workers at a time; concurrent callers run inline
};

}  // namespace k2sys
