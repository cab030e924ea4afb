// Pinned host staging and a ring-pipelined host->device copy on a dedicated copy stream.
#pragma once
#include <cstddef>
#include <cstdint>

namespace k2sys::cuda {

int device_count();  // 0 when no driver/device (never throws)

void* pinned_alloc(std::size_t nbytes);  // cudaHostAlloc (portable)
void pinned_free(void* p);
void host_register(void* p, std::size_t nbytes);  // pin existing memory (cudaHostRegister)
void host_unregister(void* p);

// Copies nbytes from pageable or pinned host memory at src to device memory at dst.
// Pageable sources go through a ring of `ring` pinned staging buffers of `chunk_bytes`:
// CPU memcpy into slot i+1 overlaps the async H2D of slot i (events guard slot reuse).
// Pinned sources are copied directly in chunks on the copy stream. Blocks until done.
void h2d_pipelined(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, bool src_pinned, int device,
                   std::size_t chunk_bytes, int ring);

// Device->host (pinned destination), one async copy on the copy stream, then sync.
void d2h(std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, int device);

}  // namespace k2sys::cuda
