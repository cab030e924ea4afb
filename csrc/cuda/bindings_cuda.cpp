// k2sys._cuda: CUDA runtime pieces bound for Python. Importable without a GPU (static cudart);
// device_count() == 0 there, and k2sys.ext reports HAS_CUDA = False.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cuda/batched_copy.h"
#include "cuda/onload_cuda.h"
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

  // ---- the checkpoint engine's device pieces (same API as the CPU ones in k2sys._C) ----
  m.def(
      "batched_strided_copy_ptr",
      [](std::uintptr_t rows, std::size_t n, int device, std::uintptr_t stream) {
        if (n && !rows) throw std::invalid_argument("batched_strided_copy_ptr: null rows address");
        py::gil_scoped_release nogil;
        kc::batched_strided_copy_d2d(reinterpret_cast<const k2sys::StridedRow*>(rows), n, device, stream);
      },
      py::arg("rows"), py::arg("n"), py::arg("device") = 0, py::arg("stream") = 0,
      "One kernel launch for n strided box copies (host int64 [n, 12] row table, device addresses).");
  m.def(
      "crc32c_device",
      [](std::uintptr_t ptr, std::size_t nbytes, int device, std::uintptr_t stream) {
        py::gil_scoped_release nogil;
        return kc::crc32c_device(reinterpret_cast<const void*>(ptr), nbytes, device, stream);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("device") = 0, py::arg("stream") = 0);

  py::class_<kc::PinnedPool>(m, "PinnedPool", "cudaHostAlloc buffers reused across updates.")
      .def(py::init<std::size_t>(), py::arg("alignment") = 4096)
      .def("acquire", [](kc::PinnedPool& p, std::size_t n) { return reinterpret_cast<std::uintptr_t>(p.acquire(n)); })
      .def("release", [](kc::PinnedPool& p, std::uintptr_t a) { p.release(reinterpret_cast<void*>(a)); })
      .def("capacity_of", [](kc::PinnedPool& p, std::uintptr_t a) { return p.capacity_of(reinterpret_cast<void*>(a)); })
      .def("trim", &kc::PinnedPool::trim)
      .def_property_readonly("alignment", &kc::PinnedPool::alignment)
      .def("stats", [](kc::PinnedPool& p) {
        const auto s = p.stats();
        py::dict d;
        d["bytes_cached"] = s.bytes_cached;
        d["bytes_leased"] = s.bytes_leased;
        d["allocations"] = s.allocations;
        d["reuses"] = s.reuses;
        return d;
      });

  py::class_<kc::H2DOnloader>(m, "H2DOnloader")
      .def(py::init<int, std::size_t, int>(), py::arg("device") = 0, py::arg("chunk_bytes") = 32u << 20,
           py::arg("ring") = 3)
      .def(
          "submit",
          [](kc::H2DOnloader& o, std::uintptr_t dst, std::uintptr_t src, std::size_t n, bool pinned) {
            return o.submit(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n, pinned);
          },
          py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("src_pinned") = false)
      .def("done", &kc::H2DOnloader::done)
      .def("wait", &kc::H2DOnloader::wait, py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &kc::H2DOnloader::synchronize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("stream", &kc::H2DOnloader::stream)
      .def_property_readonly("chunk_bytes", &kc::H2DOnloader::chunk_bytes)
      .def_property_readonly("ring", &kc::H2DOnloader::ring);
}
