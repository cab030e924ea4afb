#include <cstring>
#include <mutex>
#include <vector>

#include "cuda/cuda_check.h"
#include "cuda/staging.h"

namespace k2sys::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

void* pinned_alloc(std::size_t nbytes) {
  void* p = nullptr;
  K2_CUDA_CHECK(cudaHostAlloc(&p, nbytes, cudaHostAllocPortable));
  return p;
}

void pinned_free(void* p) { K2_CUDA_CHECK(cudaFreeHost(p)); }

void host_register(void* p, std::size_t nbytes) { K2_CUDA_CHECK(cudaHostRegister(p, nbytes, cudaHostRegisterPortable)); }

void host_unregister(void* p) { K2_CUDA_CHECK(cudaHostUnregister(p)); }

namespace {

struct Ring {
  int device = -1;
  std::size_t chunk = 0;
  cudaStream_t stream = nullptr;
  std::vector<void*> slots;
  std::vector<cudaEvent_t> done;
};

std::mutex g_mu;
Ring g_ring;  // reused across calls: staging buffers are allocated once per (device, chunk, ring)

Ring& get_ring(int device, std::size_t chunk, int ring) {
  if (g_ring.device == device && g_ring.chunk == chunk && static_cast<int>(g_ring.slots.size()) == ring) return g_ring;
  if (g_ring.stream) {
    K2_CUDA_CHECK(cudaSetDevice(g_ring.device));
    K2_CUDA_CHECK(cudaStreamSynchronize(g_ring.stream));
    for (auto* s : g_ring.slots) K2_CUDA_CHECK(cudaFreeHost(s));
    for (auto e : g_ring.done) K2_CUDA_CHECK(cudaEventDestroy(e));
    K2_CUDA_CHECK(cudaStreamDestroy(g_ring.stream));
  }
  g_ring = Ring{};
  K2_CUDA_CHECK(cudaSetDevice(device));
  K2_CUDA_CHECK(cudaStreamCreateWithFlags(&g_ring.stream, cudaStreamNonBlocking));
  for (int i = 0; i < ring; ++i) {
    void* p = nullptr;
    K2_CUDA_CHECK(cudaHostAlloc(&p, chunk, cudaHostAllocPortable));
    g_ring.slots.push_back(p);
    cudaEvent_t e;
    K2_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    g_ring.done.push_back(e);
  }
  g_ring.device = device;
  g_ring.chunk = chunk;
  return g_ring;
}

}  // namespace

void h2d_pipelined(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, bool src_pinned, int device,
                   std::size_t chunk_bytes, int ring) {
  if (nbytes == 0) return;
  if (ring < 2) ring = 2;
  if (chunk_bytes == 0) chunk_bytes = 32u << 20;
  std::lock_guard<std::mutex> g(g_mu);
  Ring& r = get_ring(device, chunk_bytes, ring);
  K2_CUDA_CHECK(cudaSetDevice(device));
  auto* d = reinterpret_cast<char*>(dst);
  const auto* s = reinterpret_cast<const char*>(src);
  if (src_pinned) {
    for (std::size_t off = 0; off < nbytes; off += chunk_bytes)
      K2_CUDA_CHECK(cudaMemcpyAsync(d + off, s + off, std::min(chunk_bytes, nbytes - off), cudaMemcpyHostToDevice,
                                    r.stream));
    K2_CUDA_CHECK(cudaStreamSynchronize(r.stream));
    return;
  }
  std::vector<bool> used(ring, false);
  std::size_t i = 0;
  for (std::size_t off = 0; off < nbytes; off += chunk_bytes, ++i) {
    const int slot = static_cast<int>(i % ring);
    const std::size_t len = std::min(chunk_bytes, nbytes - off);
    if (used[slot]) K2_CUDA_CHECK(cudaEventSynchronize(r.done[slot]));  // slot's previous H2D finished
    std::memcpy(r.slots[slot], s + off, len);
    K2_CUDA_CHECK(cudaMemcpyAsync(d + off, r.slots[slot], len, cudaMemcpyHostToDevice, r.stream));
    K2_CUDA_CHECK(cudaEventRecord(r.done[slot], r.stream));
    used[slot] = true;
  }
  K2_CUDA_CHECK(cudaStreamSynchronize(r.stream));
}

void d2h(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, int device) {
  if (nbytes == 0) return;
  K2_CUDA_CHECK(cudaSetDevice(device));
  cudaStream_t st;
  K2_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  K2_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                                cudaMemcpyDeviceToHost, st));
  K2_CUDA_CHECK(cudaStreamSynchronize(st));
  K2_CUDA_CHECK(cudaStreamDestroy(st));
}

}  // namespace k2sys::cuda
