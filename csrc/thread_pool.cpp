#include "thread_pool.h"

#include <chrono>
#include <map>
#include <memory>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define K2SYS_PAUSE() _mm_pause()
#else
#define K2SYS_PAUSE() ((void)0)
#endif

namespace k2sys {
namespace {

// Spins until done() or kSpinMicros passed; true if done() held.
template <class Done>
bool spin_until(Done done) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(ThreadPool::kSpinMicros);
  for (int i = 0;; ++i) {
    if (done()) return true;
    K2SYS_PAUSE();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= end) return done();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::drain(const std::function<void(std::size_t)>* fn) {
  for (;;) {
    std::size_t idx;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (job_ != fn || next_task_ >= num_tasks_) return;
      idx = next_task_++;
    }
    try {
      (*fn)(idx);
    } catch (...) {
      std::lock_guard<std::mutex> g(mu_);
      if (!error_) error_ = std::current_exception();
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      if (++done_tasks_ == num_tasks_) cv_done_.notify_all();
    }
  }
}

void ThreadPool::worker_loop() {
  std::size_t seen = 0;
  for (;;) {
    const std::function<void(std::size_t)>* fn;
    if (spin_.load(std::memory_order_relaxed))
      spin_until([&] { return stop_.load(std::memory_order_relaxed) || generation_.load(std::memory_order_acquire) != seen; });
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk, [&] { return stop_ || (job_ != nullptr && generation_ != seen); });
      if (stop_) return;
      seen = generation_;
      fn = job_;
    }
    drain(fn);
  }
}

void ThreadPool::run(std::size_t num_tasks, const std::function<void(std::size_t)>& fn, bool spin) {
  if (num_tasks == 0) return;
  // One job owns the workers at a time. A second concurrent caller (e.g. the pipeline's stage
  // thread while its apply thread holds the pool) runs its job inline instead of queueing, so
  // both make progress and neither waits for the other's whole job.
  std::unique_lock<std::mutex> one(run_mu_, std::try_to_lock);
  if (!one.owns_lock() || workers_.empty() || num_tasks == 1) {
    for (std::size_t i = 0; i < num_tasks; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> g(mu_);
    job_ = &fn;
    num_tasks_ = num_tasks;
    next_task_ = 0;
    done_tasks_ = 0;
    error_ = nullptr;
    spin_.store(spin, std::memory_order_relaxed);
    ++generation_;
  }
  cv_work_.notify_all();
  drain(&fn);
  std::exception_ptr err;
  if (spin) spin_until([&] { return done_tasks_.load(std::memory_order_acquire) == num_tasks; });
  {
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [&] { return done_tasks_ == num_tasks_; });
    job_ = nullptr;
    err = error_;
  }
  if (err) std::rethrow_exception(err);
}

ThreadPool& ThreadPool::global(int threads) {
  // One pool per requested size, created on first use and kept for the process lifetime:
  // replacing a pool here could destroy one that another thread is running a job on.
  static std::mutex mu;
  static std::map<int, std::unique_ptr<ThreadPool>> pools;
  if (threads <= 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  std::lock_guard<std::mutex> g(mu);
  auto& pool = pools[threads];
  if (!pool) pool = std::make_unique<ThreadPool>(threads);
  return *pool;
}

}  // namespace k2sys
