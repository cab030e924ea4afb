#include <algorithm>
#include <cstring>
#include <string>

#include "crc32c.h"
#include "cuda/cuda_check.h"
#include "cuda/onload_cuda.h"

namespace k2sys::cuda {

void* PinnedHostAlloc::allocate(std::size_t nbytes, std::size_t) {
  void* p = nullptr;
  K2_CUDA_CHECK(cudaHostAlloc(&p, nbytes, cudaHostAllocPortable));
  return p;
}

void PinnedHostAlloc::release(void* p) { cudaFreeHost(p); }

// ---------------------------------------------------------------- H2DOnloader

H2DOnloader::H2DOnloader(int device, std::size_t chunk_bytes, int ring) : device_(device), chunk_(chunk_bytes) {
  if (ring < 1) throw std::invalid_argument("H2DOnloader: ring must be >= 1");
  if (chunk_ == 0) chunk_ = 32u << 20;
  K2_CUDA_CHECK(cudaSetDevice(device_));
  K2_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  for (int i = 0; i < ring; ++i) {
    void* p = nullptr;
    K2_CUDA_CHECK(cudaHostAlloc(&p, chunk_, cudaHostAllocPortable));
    slots_.push_back(p);
    cudaEvent_t e;
    K2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    slot_free_.push_back(e);
    slot_used_.push_back(false);
  }
  worker_ = std::thread([this] { worker_loop(); });
}

H2DOnloader::~H2DOnloader() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_work_.notify_all();
  worker_.join();
  cudaSetDevice(device_);
  cudaStreamSynchronize(stream_);
  for (auto& r : recorded_) cudaEventDestroy(r.second);
  for (auto e : slot_free_) cudaEventDestroy(e);
  for (void* p : slots_) cudaFreeHost(p);
  cudaStreamDestroy(stream_);
}

std::uint64_t H2DOnloader::submit(void* dst, const void* src, std::size_t nbytes, bool src_pinned) {
  std::lock_guard<std::mutex> g(mu_);
  if (!error_.empty()) throw std::runtime_error("H2DOnloader: an earlier copy failed: " + error_);
  const std::uint64_t t = next_ticket_++;
  queue_.push_back({t, static_cast<char*>(dst), static_cast<const char*>(src), nbytes, src_pinned});
  cv_work_.notify_one();
  return t;
}

void H2DOnloader::run_job(const Job& j) {
  if (j.pinned) {
    // Pinned memory: the DMA engine reads it directly, no bounce needed.
    if (j.len) K2_CUDA_CHECK(cudaMemcpyAsync(j.dst, j.src, j.len, cudaMemcpyHostToDevice, stream_));
    return;
  }
  std::size_t i = 0;
  for (std::size_t off = 0; off < j.len; off += chunk_, ++i) {
    const std::size_t slot = i % slots_.size(), len = std::min(chunk_, j.len - off);
    // Wait only for this slot's previous H2D: the memcpy into slot k+1 overlaps the DMA of slot k.
    if (slot_used_[slot]) K2_CUDA_CHECK(cudaEventSynchronize(slot_free_[slot]));
    std::memcpy(slots_[slot], j.src + off, len);
    K2_CUDA_CHECK(cudaMemcpyAsync(j.dst + off, slots_[slot], len, cudaMemcpyHostToDevice, stream_));
    K2_CUDA_CHECK(cudaEventRecord(slot_free_[slot], stream_));
    slot_used_[slot] = true;
  }
}

void H2DOnloader::worker_loop() {
  bool device_set = false;
  for (;;) {
    Job j;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_work_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (stop_ && queue_.empty()) return;
      j = queue_.front();
      queue_.pop_front();
    }
    cudaEvent_t end = nullptr;
    std::string err;
    try {
      if (!device_set) {
        K2_CUDA_CHECK(cudaSetDevice(device_));
        device_set = true;
      }
      run_job(j);
      K2_CUDA_CHECK(cudaEventCreateWithFlags(&end, cudaEventDisableTiming));
      K2_CUDA_CHECK(cudaEventRecord(end, stream_));
    } catch (const std::exception& e) {
      err = e.what();
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      if (!err.empty() && error_.empty()) error_ = err;
      if (end) recorded_.emplace_back(j.ticket, end);
      enqueued_below_ = j.ticket + 1;
    }
    cv_done_.notify_all();
  }
}

bool H2DOnloader::done(std::uint64_t ticket) {
  std::lock_guard<std::mutex> g(mu_);
  if (!error_.empty()) throw std::runtime_error("H2DOnloader: " + error_);
  if (ticket >= enqueued_below_) return false;
  for (auto& r : recorded_)
    if (r.first >= ticket) return cudaEventQuery(r.second) == cudaSuccess;
  return true;
}

void H2DOnloader::wait(std::uint64_t ticket) {
  cudaEvent_t ev = nullptr;
  {
    std::unique_lock<std::mutex> lk(mu_);
    if (ticket >= next_ticket_) throw std::invalid_argument("H2DOnloader.wait: unknown ticket " + std::to_string(ticket));
    cv_done_.wait(lk, [&] { return ticket < enqueued_below_ || !error_.empty(); });
    if (!error_.empty()) throw std::runtime_error("H2DOnloader: " + error_);
    for (auto& r : recorded_)
      if (r.first >= ticket) {
        ev = r.second;
        break;
      }
  }
  if (ev) K2_CUDA_CHECK(cudaEventSynchronize(ev));
  // Drop events of finished jobs so the list stays short.
  std::lock_guard<std::mutex> g(mu_);
  while (!recorded_.empty() && recorded_.front().first <= ticket) {
    cudaEventDestroy(recorded_.front().second);
    recorded_.pop_front();
  }
}

void H2DOnloader::synchronize() {
  std::uint64_t last;
  {
    std::lock_guard<std::mutex> g(mu_);
    last = next_ticket_ - 1;
  }
  if (last >= 1) wait(last);
}

// ---------------------------------------------------------------- strided copy kernel

namespace {

template <typename T>
__device__ void copy_row(const k2sys::StridedRow& r, std::uint64_t words_per_run, std::uint64_t total_words,
                         std::uint64_t tid, std::uint64_t stride) {
  for (std::uint64_t w = tid; w < total_words; w += stride) {
    const std::uint64_t run = w / words_per_run, within = w % words_per_run;
    const std::uint64_t i2 = run % r.n[2], i1 = (run / r.n[2]) % r.n[1], i0 = run / (r.n[1] * r.n[2]);
    const std::int64_t doff = i0 * r.dst_s[0] + i1 * r.dst_s[1] + i2 * r.dst_s[2];
    const std::int64_t soff = i0 * r.src_s[0] + i1 * r.src_s[1] + i2 * r.src_s[2];
    reinterpret_cast<T*>(r.dst + doff)[within] = reinterpret_cast<const T*>(r.src + soff)[within];
  }
}

__global__ void strided_copy_kernel(const k2sys::StridedRow* __restrict__ rows, std::size_t n) {
  const std::uint64_t tid = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::uint64_t stride = static_cast<std::uint64_t>(gridDim.x) * blockDim.x;
  for (std::size_t i = blockIdx.y; i < n; i += gridDim.y) {
    const k2sys::StridedRow r = rows[i];
    const std::uint64_t runs = static_cast<std::uint64_t>(r.n[0]) * r.n[1] * r.n[2];
    // Widest word every address, stride and run length is a multiple of.
    std::uint64_t m = r.dst | r.src | r.run_bytes;
    for (int k = 0; k < 3; ++k) m |= r.dst_s[k] | r.src_s[k];
    if ((m & 15) == 0)
      copy_row<uint4>(r, r.run_bytes / 16, runs * (r.run_bytes / 16), tid, stride);
    else if ((m & 7) == 0)
      copy_row<std::uint64_t>(r, r.run_bytes / 8, runs * (r.run_bytes / 8), tid, stride);
    else if ((m & 3) == 0)
      copy_row<std::uint32_t>(r, r.run_bytes / 4, runs * (r.run_bytes / 4), tid, stride);
    else if ((m & 1) == 0)
      copy_row<std::uint16_t>(r, r.run_bytes / 2, runs * (r.run_bytes / 2), tid, stride);
    else
      copy_row<unsigned char>(r, r.run_bytes, runs * r.run_bytes, tid, stride);
  }
}

}  // namespace

void batched_strided_copy_d2d(const k2sys::StridedRow* rows, std::size_t n, int device, std::uintptr_t stream) {
  const std::uint64_t total = k2sys::strided_rows_bytes(rows, n);
  if (total == 0) return;
  K2_CUDA_CHECK(cudaSetDevice(device));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  std::uint64_t max_row = 0;
  for (std::size_t i = 0; i < n; ++i)
    max_row = std::max<std::uint64_t>(max_row, static_cast<std::uint64_t>(rows[i].run_bytes) * rows[i].n[0] *
                                                   rows[i].n[1] * rows[i].n[2]);
  k2sys::StridedRow* drows = nullptr;
  K2_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&drows), n * sizeof(k2sys::StridedRow), st));
  K2_CUDA_CHECK(cudaMemcpyAsync(drows, rows, n * sizeof(k2sys::StridedRow), cudaMemcpyHostToDevice, st));
  const int threads = 256;
  const unsigned gx = static_cast<unsigned>(std::clamp<std::uint64_t>((max_row / 16 + threads - 1) / threads, 1, 2048));
  const unsigned gy = static_cast<unsigned>(std::min<std::size_t>(n, 65535));
  strided_copy_kernel<<<dim3(gx, gy), threads, 0, st>>>(drows, n);
  K2_CUDA_CHECK(cudaGetLastError());
  K2_CUDA_CHECK(cudaFreeAsync(drows, st));
  // The host row table may be freed by the caller once this returns.
  K2_CUDA_CHECK(cudaStreamSynchronize(st));
}

// ---------------------------------------------------------------- crc32c on device

namespace {

constexpr std::size_t kCrcSegment = 64 << 10;

__global__ void crc32c_segments_kernel(const unsigned char* __restrict__ data, std::size_t nbytes,
                                       std::uint32_t* __restrict__ out, std::size_t n_segments) {
  __shared__ std::uint32_t table[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    table[i] = c;
  }
  __syncthreads();
  const std::size_t seg = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (seg >= n_segments) return;
  const std::size_t begin = seg * kCrcSegment, end = min(nbytes, begin + kCrcSegment);
  std::uint32_t c = 0xFFFFFFFFu;
  for (std::size_t i = begin; i < end; ++i) c = (c >> 8) ^ table[(c ^ data[i]) & 0xFF];
  out[seg] = ~c;
}

}  // namespace

std::uint32_t crc32c_device(const void* data, std::size_t nbytes, int device, std::uintptr_t stream) {
  if (nbytes == 0) return 0;
  K2_CUDA_CHECK(cudaSetDevice(device));
  auto st = reinterpret_cast<cudaStream_t>(stream);
  const std::size_t n_seg = (nbytes + kCrcSegment - 1) / kCrcSegment;
  std::uint32_t* dout = nullptr;
  K2_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&dout), n_seg * sizeof(std::uint32_t), st));
  const int threads = 128;
  crc32c_segments_kernel<<<static_cast<unsigned>((n_seg + threads - 1) / threads), threads, 0, st>>>(
      static_cast<const unsigned char*>(data), nbytes, dout, n_seg);
  K2_CUDA_CHECK(cudaGetLastError());
  std::vector<std::uint32_t> seg(n_seg);
  K2_CUDA_CHECK(cudaMemcpyAsync(seg.data(), dout, n_seg * sizeof(std::uint32_t), cudaMemcpyDeviceToHost, st));
  K2_CUDA_CHECK(cudaFreeAsync(dout, st));
  K2_CUDA_CHECK(cudaStreamSynchronize(st));
  // Fold segment crcs on the host: crc(A||B) = shift_len(B)(crc(A)) ^ crc(B).
  const std::uint32_t op = k2sys::crc32c_zeros_op(kCrcSegment);
  std::uint32_t c = 0;
  for (std::size_t i = 0; i < n_seg; ++i) {
    const std::size_t len = std::min(kCrcSegment, nbytes - i * kCrcSegment);
    c = (len == kCrcSegment ? k2sys::crc32c_shift(op, c) : k2sys::crc32c_shift(k2sys::crc32c_zeros_op(len), c)) ^ seg[i];
  }
  return c;
}

}  // namespace k2sys::cuda
