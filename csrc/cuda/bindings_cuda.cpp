// k2sys._cuda: CUDA runtime pieces bound for Python. Importable without a GPU (static cudart);
// device_count() == 0 there, and k2sys.ext reports HAS_CUDA = False.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cuda/batched_copy.h"
#include "cuda/staging.h"

namespace py = pybind11;
namespace kc = k2sys::cuda;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "k2sys CUDA extension: pinned staging, pipelined H2D, batched device slice copy";
  m.def("device_count", &kc::device_count);
  m.def("pinned_alloc", [](std::size_t n) { return reinterpret_cast<std::uintptr_t>(kc::pinned_alloc(n)); });
  m.def("pinned_free", [](std::uintptr_t p) { kc::pinned_free(reinterpret_cast<void*>(p)); });
  m.def("host_register", [](std::uintptr_t p, std::size_t n) { kc::host_register(reinterpret_cast<void*>(p), n); });
  m.def("host_unregister", [](std::uintptr_t p) { kc::host_unregister(reinterpret_cast<void*>(p)); });
  m.def(
      "h2d_pipelined",
      [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, bool src_pinned, int device, std::size_t chunk,
         int ring) {
        py::gil_scoped_release nogil;
        kc::h2d_pipelined(dst, src, nbytes, src_pinned, device, chunk, ring);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("src_pinned"), py::arg("device") = 0,
      py::arg("chunk_bytes") = 32u << 20, py::arg("ring") = 3);
  m.def(
      "d2h",
      [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, int device) {
        py::gil_scoped_release nogil;
        kc::d2h(dst, src, nbytes, device);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("device") = 0);
  m.def(
      "batched_copy_d2d",
      [](const std::vector<std::uint64_t>& dst, const std::vector<std::uint64_t>& src,
         const std::vector<std::uint64_t>& sizes, int device, std::uintptr_t stream) {
        if (dst.size() != src.size() || dst.size() != sizes.size())
          throw std::invalid_argument("batched_copy_d2d: dst, src and sizes must have the same length");
        py::gil_scoped_release nogil;
        kc::batched_copy_d2d(dst.data(), src.data(), sizes.data(), dst.size(), device, stream);
      },
      py::arg("dst"), py::arg("src"), py::arg("sizes"), py::arg("device") = 0, py::arg("stream") = 0);
}
