// k2sys._C: pybind11 bindings of the C++ core. Works on raw addresses and the Python buffer
// protocol, so it needs no libtorch (the Python facade k2sys.ext passes tensor.data_ptr()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <thread>
#include <vector>

#include "host_copy.h"
#include "thread_pool.h"

namespace py = pybind11;

namespace {

py::buffer_info writable_info(const py::buffer& b, const char* what) {
  py::buffer_info info = b.request(/*writable=*/true);
  if (info.readonly) throw std::invalid_argument(std::string(what) + " is read-only");
  return info;
}

std::size_t contiguous_nbytes(const py::buffer_info& info, const char* what) {
  // Accept only C-contiguous buffers: a strided view would be copied wrongly as raw bytes.
  py::ssize_t expect = info.itemsize;
  for (py::ssize_t i = info.ndim - 1; i >= 0; --i) {
    if (info.shape[i] != 1 && info.strides[i] != expect)
      throw std::invalid_argument(std::string(what) + " must be C-contiguous (call .contiguous() first)");
    expect *= info.shape[i];
  }
  return static_cast<std::size_t>(info.size * info.itemsize);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "k2sys C++ core: threaded host copies for the onload/reshard path";

  m.def("hardware_threads", [] { return static_cast<int>(std::thread::hardware_concurrency()); });

  m.def(
      "copy_ptr",
      [](std::uintptr_t dst, std::uintptr_t src, std::size_t nbytes, int threads, std::int64_t chunk_bytes) {
        if (nbytes && (!dst || !src)) throw std::invalid_argument("copy_ptr: null address");
        py::gil_scoped_release nogil;
        k2sys::parallel_copy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes, threads,
                             chunk_bytes);
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("threads") = 0, py::arg("chunk_bytes") = 0,
      "Copy nbytes from address src to address dst with a thread pool (regions must not overlap).");

  m.def(
      "copy_buffer",
      [](py::buffer dst, py::buffer src, int threads, std::int64_t chunk_bytes) {
        py::buffer_info d = writable_info(dst, "dst");
        py::buffer_info s = src.request();
        const std::size_t nd = contiguous_nbytes(d, "dst"), ns = contiguous_nbytes(s, "src");
        if (nd != ns)
          throw std::invalid_argument("copy_buffer: dst has " + std::to_string(nd) + " bytes but src has " +
                                      std::to_string(ns));
        py::gil_scoped_release nogil;
        k2sys::parallel_copy(d.ptr, s.ptr, nd, threads, chunk_bytes);
      },
      py::arg("dst"), py::arg("src"), py::arg("threads") = 0, py::arg("chunk_bytes") = 0,
      "Copy a C-contiguous buffer into another of the same byte size with a thread pool.");

  m.def(
      "batched_copy_ptr",
      [](const std::vector<std::uint64_t>& dst, const std::vector<std::uint64_t>& src,
         const std::vector<std::uint64_t>& sizes, int threads, std::int64_t chunk_bytes) {
        if (dst.size() != src.size() || dst.size() != sizes.size())
          throw std::invalid_argument("batched_copy_ptr: dst, src and sizes must have the same length");
        py::gil_scoped_release nogil;
        k2sys::batched_copy(dst.data(), src.data(), sizes.data(), dst.size(), threads, chunk_bytes);
      },
      py::arg("dst"), py::arg("src"), py::arg("sizes"), py::arg("threads") = 0, py::arg("chunk_bytes") = 0,
      "Apply many (dst, src, nbytes) copies in one call, balanced over the thread pool.");
}
