// k2sys._C: pybind11 bindings of the C++ core. Works on raw addresses and the Python buffer
// protocol, so it needs no libtorch (the Python facade k2sys.ext passes tensor.data_ptr()).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <atomic>
#include <stdexcept>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <thread>
#include <vector>

#include "blocked_pack.h"
#include "buffer_pool.h"
#include "crc32c.h"
#include "decode_layer.h"
#include "fp8_quant.h"
#include "gemv.h"
#include "host_copy.h"
#include "onload.h"
#include "strided_copy.h"
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

k2sys::CrcImpl parse_impl(const std::string& impl) {
  if (impl == "auto") return k2sys::CrcImpl::kAuto;
  if (impl == "table") return k2sys::CrcImpl::kTable;
  if (impl == "hw") return k2sys::CrcImpl::kHardware;
  throw std::invalid_argument("crc32c: impl must be 'auto', 'table' or 'hw', got '" + impl + "'");
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

  m.def(
      "batched_zero_ptr",
      [](const std::vector<std::uint64_t>& dst, const std::vector<std::uint64_t>& sizes, int threads) {
        if (dst.size() != sizes.size())
          throw std::invalid_argument("batched_zero_ptr: dst and sizes must have the same length");
        for (std::size_t i = 0; i < dst.size(); ++i)
          if (sizes[i] && !dst[i]) throw std::invalid_argument("batched_zero_ptr: null address");
        py::gil_scoped_release nogil;
        k2sys::batched_zero(dst.data(), sizes.data(), dst.size(), threads);
      },
      py::arg("dst"), py::arg("sizes"), py::arg("threads") = 0,
      "Zero many (address, nbytes) regions in one call, over the thread pool, with streaming stores.");

  // ---- strided batched slice copy (reshard apply) ----
  m.attr("STRIDED_COLS") = k2sys::kStridedCols;
  m.def(
      "batched_strided_copy_ptr",
      [](std::uintptr_t rows, std::size_t n, int threads, std::int64_t chunk_bytes) {
        if (n && !rows) throw std::invalid_argument("batched_strided_copy_ptr: null rows address");
        py::gil_scoped_release nogil;
        k2sys::batched_strided_copy(reinterpret_cast<const k2sys::StridedRow*>(rows), n, threads, chunk_bytes);
      },
      py::arg("rows"), py::arg("n"), py::arg("threads") = 0, py::arg("chunk_bytes") = 0,
      "Apply n strided box copies described by an int64 [n, 12] row table at address `rows`.");
  m.def(
      "batched_strided_copy_crc_ptr",
      [](std::uintptr_t rows, std::size_t n, int threads, std::int64_t chunk_bytes, std::uintptr_t base,
         std::uint64_t len, bool crc_source) -> py::object {
        if (n && !rows) throw std::invalid_argument("batched_strided_copy_crc_ptr: null rows address");
        if (len && !base) throw std::invalid_argument("batched_strided_copy_crc_ptr: null region address");
        std::uint32_t crc = 0;
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = k2sys::batched_strided_copy_crc(reinterpret_cast<const k2sys::StridedRow*>(rows), n, threads,
                                               chunk_bytes, base, len, crc_source, &crc);
        }
        if (!ok) return py::none();
        return py::int_(crc);
      },
      py::arg("rows"), py::arg("n"), py::arg("threads"), py::arg("chunk_bytes"), py::arg("base"), py::arg("len"),
      py::arg("crc_source"),
      "The strided copies with the crc32c of the region [base, base+len) on their source (crc_source) or "
      "destination side fused in; None (nothing copied) when the rows do not tile the region contiguously.");

  // ---- blocked weight packing (oneDNN's inner-product layouts, written in place) ----
  m.def(
      "pack_blocked_f32_ptr",
      [](std::uintptr_t dst, std::uintptr_t src, std::int64_t n, std::int64_t k, std::int64_t ld, std::int64_t bn,
         std::int64_t bk, bool n_fastest, bool outer_n_major, int threads) {
        if (!dst || !src) throw std::invalid_argument("pack_blocked_f32_ptr: null address");
        k2sys::BlockedLayout lay{bn, bk, n_fastest, outer_n_major};
        py::gil_scoped_release nogil;
        k2sys::pack_blocked_f32(reinterpret_cast<float*>(dst), reinterpret_cast<const float*>(src), n, k, ld, lay,
                                threads);
      },
      py::arg("dst"), py::arg("src"), py::arg("n"), py::arg("k"), py::arg("ld"), py::arg("bn"), py::arg("bk"),
      py::arg("n_fastest"), py::arg("outer_n_major"), py::arg("threads") = 0,
      "Pack fp32 W [n, k] (row stride ld) into the blocked layout (bn x bk blocks) at dst, padding zeroed.");

  m.def(
      "store_fence",
      [] {
#if defined(__x86_64__)
        _mm_sfence();  // streaming (non-temporal) stores of a finished copy are ordered before what follows
#endif
        std::atomic_thread_fence(std::memory_order_seq_cst);
      },
      "Order every store this thread made (streaming ones included) before its later stores.");

  // ---- crc32c ----
  m.def("crc32c_hw_available", &k2sys::crc32c_hw_available);
  m.def(
      "crc32c",
      [](py::buffer data, std::uint32_t crc, const std::string& impl) {
        py::buffer_info info = data.request();
        const std::size_t n = contiguous_nbytes(info, "data");
        const auto which = parse_impl(impl);
        py::gil_scoped_release nogil;
        return k2sys::crc32c(crc, info.ptr, n, which);
      },
      py::arg("data"), py::arg("crc") = 0, py::arg("impl") = "auto",
      "crc32c of a C-contiguous buffer, continuing from `crc`.");
  m.def(
      "crc32c_ptr",
      [](std::uintptr_t ptr, std::size_t n, std::uint32_t crc, const std::string& impl) {
        if (n && !ptr) throw std::invalid_argument("crc32c_ptr: null address");
        const auto which = parse_impl(impl);
        py::gil_scoped_release nogil;
        return k2sys::crc32c(crc, reinterpret_cast<const void*>(ptr), n, which);
      },
      py::arg("ptr"), py::arg("nbytes"), py::arg("crc") = 0, py::arg("impl") = "auto");
  m.def(
      "crc32c_batched_ptr",
      [](const std::vector<std::uint64_t>& ptrs, const std::vector<std::uint64_t>& sizes, int threads,
         const std::string& impl) {
        if (ptrs.size() != sizes.size()) throw std::invalid_argument("crc32c_batched_ptr: ptrs and sizes differ in length");
        const auto which = parse_impl(impl);
        std::vector<std::uint32_t> out(ptrs.size());
        {
          py::gil_scoped_release nogil;
          k2sys::crc32c_batched(ptrs.data(), sizes.data(), ptrs.size(), out.data(), threads, which);
        }
        return out;
      },
      py::arg("ptrs"), py::arg("sizes"), py::arg("threads") = 0, py::arg("impl") = "auto",
      "crc32c of many buffers, chunked over the thread pool and combined.");
  m.def("crc32c_combine", &k2sys::crc32c_combine, py::arg("crc_a"), py::arg("crc_b"), py::arg("len_b"));

  // ---- fp32 GEMV for batch-1 decode (csrc/gemv.h) ----
  m.def(
      "gemv_f32_ptr",
      [](std::uintptr_t y, std::uintptr_t w, std::uintptr_t x, std::uintptr_t bias, std::int64_t rows,
         std::int64_t cols, std::int64_t ldw, int threads) {
        if (rows && (!y || !w || !x)) throw std::invalid_argument("gemv_f32_ptr: null address");
        py::gil_scoped_release nogil;
        k2sys::gemv_f32(reinterpret_cast<float*>(y), reinterpret_cast<const float*>(w),
                        reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(bias), rows, cols, ldw,
                        threads);
      },
      py::arg("y"), py::arg("w"), py::arg("x"), py::arg("bias"), py::arg("rows"), py::arg("cols"), py::arg("ldw"),
      py::arg("threads"), "y[rows] = w[rows, cols] (row stride ldw) @ x[cols] (+ bias); fp32 addresses");
  m.def(
      "moe_pairs_f32_ptr",
      [](std::uintptr_t out, std::uintptr_t x, std::uintptr_t w13, std::uintptr_t w2, std::uintptr_t ids,
         std::uintptr_t weights, std::int64_t T, std::int64_t k, std::int64_t D, std::int64_t I,
         std::int64_t stride13, std::int64_t stride2, std::int64_t num_experts, int threads) {
        if (T && (!out || !x || !w13 || !w2 || !ids || !weights))
          throw std::invalid_argument("moe_pairs_f32_ptr: null address");
        py::gil_scoped_release nogil;
        k2sys::moe_pairs_f32(reinterpret_cast<float*>(out), reinterpret_cast<const float*>(x),
                             reinterpret_cast<const float*>(w13), reinterpret_cast<const float*>(w2),
                             reinterpret_cast<const std::int64_t*>(ids), reinterpret_cast<const float*>(weights), T, k,
                             D, I, stride13, stride2, num_experts, threads);
      },
      py::arg("out"), py::arg("x"), py::arg("w13"), py::arg("w2"), py::arg("ids"), py::arg("weights"), py::arg("T"),
      py::arg("k"), py::arg("D"), py::arg("I"), py::arg("stride13"), py::arg("stride2"), py::arg("num_experts"),
      py::arg("threads"), "routed experts of T tokens x k slots through per-expert GEMV pairs; fp32 addresses");
  m.def(
      "rms_norm_f32_ptr",
      [](std::uintptr_t y, std::uintptr_t x, std::uintptr_t w, std::int64_t T, std::int64_t D, std::int64_t ldx,
         float eps) {
        if (T && (!y || !x || !w)) throw std::invalid_argument("rms_norm_f32_ptr: null address");
        k2sys::rms_norm_f32(reinterpret_cast<float*>(y), reinterpret_cast<const float*>(x),
                            reinterpret_cast<const float*>(w), T, D, ldx, eps);
      },
      py::arg("y"), py::arg("x"), py::arg("w"), py::arg("T"), py::arg("D"), py::arg("ldx"), py::arg("eps"),
      "RMSNorm of T rows (row stride ldx) into a contiguous y; fp32 addresses");
  m.def(
      "route_topk_f32_ptr",
      [](std::uintptr_t weights, std::uintptr_t ids, std::uintptr_t logits, std::uintptr_t bias, std::int64_t T,
         std::int64_t E, std::int64_t ld, int top_k, int n_group, int topk_group, float scale, bool norm) {
        if (T && (!weights || !ids || !logits)) throw std::invalid_argument("route_topk_f32_ptr: null address");
        k2sys::route_topk_f32(reinterpret_cast<float*>(weights), reinterpret_cast<std::int64_t*>(ids),
                              reinterpret_cast<const float*>(logits), reinterpret_cast<const float*>(bias), T, E, ld,
                              top_k, n_group, topk_group, scale, norm);
      },
      py::arg("weights"), py::arg("ids"), py::arg("logits"), py::arg("bias"), py::arg("T"), py::arg("E"),
      py::arg("ld"), py::arg("top_k"), py::arg("n_group"), py::arg("topk_group"), py::arg("scale"), py::arg("norm"),
      "the K2 router (k2sys.models.moe.route_topk) for T tokens; fp32 logits, int64 ids");
  m.def(
      "mla_decode_f32_ptr",
      [](std::uintptr_t o, std::uintptr_t q_nope, std::int64_t qs, std::uintptr_t q_rope, std::int64_t rs,
         std::uintptr_t w_uk, std::int64_t uks, std::uintptr_t w_uv, std::int64_t uvs, std::uintptr_t cache,
         std::uintptr_t blocks, std::int64_t num_blocks, std::int64_t block_size, std::int64_t ctx_len, std::int64_t H,
         std::int64_t N, std::int64_t C, std::int64_t R, std::int64_t V, float scale, int threads) {
        if (!o || !q_nope || !w_uk || !w_uv || !cache || !blocks || (R && !q_rope))
          throw std::invalid_argument("mla_decode_f32_ptr: null address");
        k2sys::mla_decode_f32(reinterpret_cast<float*>(o), reinterpret_cast<const float*>(q_nope), qs,
                              reinterpret_cast<const float*>(q_rope), rs, reinterpret_cast<const float*>(w_uk), uks,
                              reinterpret_cast<const float*>(w_uv), uvs, reinterpret_cast<const float*>(cache),
                              reinterpret_cast<const std::int64_t*>(blocks), num_blocks, block_size, ctx_len, H, N, C,
                              R, V, scale, threads);
      },
      py::arg("o"), py::arg("q_nope"), py::arg("qs"), py::arg("q_rope"), py::arg("rs"), py::arg("w_uk"), py::arg("uks"),
      py::arg("w_uv"), py::arg("uvs"), py::arg("cache"), py::arg("blocks"), py::arg("num_blocks"),
      py::arg("block_size"), py::arg("ctx_len"), py::arg("H"), py::arg("N"), py::arg("C"), py::arg("R"), py::arg("V"),
      py::arg("scale"), py::arg("threads"),
      "absorbed MLA attention of one decode token over its paged latent cache, all heads; fp32 addresses");
  m.def("gemv_isa", &k2sys::gemv_isa, "the GEMV kernel in use: 'avx512f', 'avx2_fma' or 'generic'");

  // ---- the batch-1 decode stack in one call (csrc/decode_layer.h) ----
  py::class_<k2sys::DecodeLayer>(m, "DecodeLayer", "one layer's fp32 weight addresses and shapes for decode_layers_f32")
      .def(py::init<>())
#define K2SYS_FIELD(name) .def_readwrite(#name, &k2sys::DecodeLayer::name)
      K2SYS_FIELD(D) K2SYS_FIELD(H) K2SYS_FIELD(N) K2SYS_FIELD(R) K2SYS_FIELD(C) K2SYS_FIELD(V) K2SYS_FIELD(q_in)
      K2SYS_FIELD(q_lora) K2SYS_FIELD(interleave) K2SYS_FIELD(eps) K2SYS_FIELD(q_eps) K2SYS_FIELD(kv_eps)
      K2SYS_FIELD(scale) K2SYS_FIELD(in_norm) K2SYS_FIELD(post_norm) K2SYS_FIELD(attn_in) K2SYS_FIELD(attn_in_bias)
      K2SYS_FIELD(q_norm) K2SYS_FIELD(q_b) K2SYS_FIELD(kv_norm) K2SYS_FIELD(w_uk) K2SYS_FIELD(w_uv)
      K2SYS_FIELD(uk_stride) K2SYS_FIELD(uv_stride) K2SYS_FIELD(o_proj) K2SYS_FIELD(o_bias) K2SYS_FIELD(cache)
      K2SYS_FIELD(num_blocks) K2SYS_FIELD(moe) K2SYS_FIELD(gate_up) K2SYS_FIELD(down) K2SYS_FIELD(inter)
      K2SYS_FIELD(router) K2SYS_FIELD(router_bias) K2SYS_FIELD(w13) K2SYS_FIELD(w2) K2SYS_FIELD(E) K2SYS_FIELD(I)
      K2SYS_FIELD(stride13) K2SYS_FIELD(stride2) K2SYS_FIELD(top_k) K2SYS_FIELD(n_group) K2SYS_FIELD(topk_group)
      K2SYS_FIELD(routed_scale) K2SYS_FIELD(norm_topk);
#undef K2SYS_FIELD
  m.def(
      "decode_layers_f32_ptr",
      [](const std::vector<const k2sys::DecodeLayer*>& layers, std::uintptr_t x, std::uintptr_t cos, std::uintptr_t sin,
         std::int64_t slot, std::uintptr_t blocks, std::int64_t block_size, std::int64_t ctx_len, int threads) {
        for (const auto* L : layers)
          if (!L) throw std::invalid_argument("decode_layers_f32_ptr: None in layers");
        py::gil_scoped_release nogil;
        k2sys::decode_layers_f32(layers, reinterpret_cast<float*>(x), reinterpret_cast<const float*>(cos),
                                 reinterpret_cast<const float*>(sin), slot, reinterpret_cast<const std::int64_t*>(blocks),
                                 block_size, ctx_len, threads);
      },
      py::arg("layers"), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("slot"), py::arg("blocks"),
      py::arg("block_size"), py::arg("ctx_len"), py::arg("threads"),
      "every decoder layer of one batch-1 decode token, in place on the residual x [D]; fp32 addresses");
  m.def(
      "decode_tokens_f32_ptr",
      [](const std::vector<const k2sys::DecodeLayer*>& layers, std::uintptr_t x, std::int64_t B, std::int64_t x_stride,
         std::uintptr_t cos_table, std::uintptr_t sin_table, std::int64_t rope_stride, std::uintptr_t positions,
         std::uintptr_t slots, std::uintptr_t blocks, std::int64_t blocks_stride, std::int64_t block_size,
         std::uintptr_t ctx_lens, int threads) {
        for (const auto* L : layers)
          if (!L) throw std::invalid_argument("decode_tokens_f32_ptr: None in layers");
        py::gil_scoped_release nogil;
        k2sys::decode_tokens_f32(layers, reinterpret_cast<float*>(x), B, x_stride,
                                 reinterpret_cast<const float*>(cos_table), reinterpret_cast<const float*>(sin_table),
                                 rope_stride, reinterpret_cast<const std::int64_t*>(positions),
                                 reinterpret_cast<const std::int64_t*>(slots),
                                 reinterpret_cast<const std::int64_t*>(blocks), blocks_stride, block_size,
                                 reinterpret_cast<const std::int64_t*>(ctx_lens), threads);
      },
      py::arg("layers"), py::arg("x"), py::arg("B"), py::arg("x_stride"), py::arg("cos_table"), py::arg("sin_table"),
      py::arg("rope_stride"), py::arg("positions"), py::arg("slots"), py::arg("blocks"), py::arg("blocks_stride"),
      py::arg("block_size"), py::arg("ctx_lens"), py::arg("threads"),
      "every decoder layer for B in-order decode tokens of different sequences, in place on x [B, x_stride]; "
      "int64 positions / slots / ctx_lens [B], block tables [B, blocks_stride]; fp32 addresses");

  // ---- FP8 e4m3fn block quantization (csrc/fp8_quant.h) ----
  m.def(
      "quantize_fp8_blocks_ptr",
      [](const std::vector<std::uint64_t>& src, const std::vector<int>& dtypes, const std::vector<std::int64_t>& rows,
         const std::vector<std::int64_t>& cols, const std::vector<std::uint64_t>& q,
         const std::vector<std::uint64_t>& scale_inv, std::int64_t block_rows, std::int64_t block_cols, int threads) {
        const std::size_t n = src.size();
        if (dtypes.size() != n || rows.size() != n || cols.size() != n || q.size() != n || scale_inv.size() != n)
          throw std::invalid_argument("quantize_fp8_blocks_ptr: src, dtypes, rows, cols, q and scale_inv must have "
                                      "the same length");
        std::vector<k2sys::Fp8QuantJob> jobs(n);
        for (std::size_t i = 0; i < n; ++i)
          jobs[i] = {reinterpret_cast<const void*>(src[i]), static_cast<k2sys::QuantSrc>(dtypes[i]), rows[i], cols[i],
                     reinterpret_cast<std::uint8_t*>(q[i]), reinterpret_cast<float*>(scale_inv[i])};
        py::gil_scoped_release nogil;
        return k2sys::quantize_fp8_blocks(jobs.data(), n, block_rows, block_cols, threads);
      },
      py::arg("src"), py::arg("dtypes"), py::arg("rows"), py::arg("cols"), py::arg("q"), py::arg("scale_inv"),
      py::arg("block_rows") = 128, py::arg("block_cols") = 128, py::arg("threads") = 0,
      "Block-quantize C-contiguous [rows, cols] tensors (dtype codes 0 fp32, 1 bf16, 2 fp16) at addresses `src` "
      "into e4m3fn bytes at `q` and fp32 scale_inv [ceil(rows/br), ceil(cols/bc)] at `scale_inv`, all blocks of all "
      "tensors over one thread pool. Returns -1, or the index of the first tensor holding a NaN/inf.");
  m.def("fp32_to_e4m3fn", &k2sys::fp32_to_e4m3fn, py::arg("x"),
        "One fp32 -> e4m3fn byte (round to nearest even, saturating at +-448).");
  m.def("e4m3fn_to_fp32", &k2sys::e4m3fn_to_fp32, py::arg("byte"));

  // ---- aligned staging pool ----
  py::class_<k2sys::HostPool>(m, "HostPool", "Aligned, pre-touched host buffers reused across updates.")
      .def(py::init<std::size_t>(), py::arg("alignment") = 4096)
      .def("acquire", [](k2sys::HostPool& p, std::size_t n) { return reinterpret_cast<std::uintptr_t>(p.acquire(n)); },
           py::arg("nbytes"), py::call_guard<py::gil_scoped_release>())
      .def("release", [](k2sys::HostPool& p, std::uintptr_t a) { p.release(reinterpret_cast<void*>(a)); })
      .def("capacity_of", [](k2sys::HostPool& p, std::uintptr_t a) { return p.capacity_of(reinterpret_cast<void*>(a)); })
      .def("trim", &k2sys::HostPool::trim)
      .def_property_readonly("alignment", &k2sys::HostPool::alignment)
      .def("stats", [](k2sys::HostPool& p) {
        const auto s = p.stats();
        py::dict d;
        d["bytes_cached"] = s.bytes_cached;
        d["bytes_leased"] = s.bytes_leased;
        d["allocations"] = s.allocations;
        d["reuses"] = s.reuses;
        return d;
      });
  m.def(
      "memoryview_at",
      [](std::uintptr_t ptr, std::size_t nbytes) {
        return py::memoryview::from_memory(reinterpret_cast<void*>(ptr), static_cast<py::ssize_t>(nbytes), false);
      },
      py::arg("ptr"), py::arg("nbytes"),
      "A writable memoryview over raw host memory (the caller keeps the memory alive).");

  // ---- CPU pipelined onload (same API as k2sys._cuda.H2DOnloader) ----
  py::class_<k2sys::CpuOnloader>(m, "CpuOnloader")
      .def(py::init<std::size_t, int, int>(), py::arg("chunk_bytes") = 16u << 20, py::arg("ring") = 4,
           py::arg("threads") = 0)
      .def(
          "submit",
          [](k2sys::CpuOnloader& o, std::uintptr_t dst, std::uintptr_t src, std::size_t n, bool pinned) {
            if (n && (!dst || !src)) throw std::invalid_argument("CpuOnloader.submit: null address");
            return o.submit(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), n, pinned);
          },
          py::arg("dst"), py::arg("src"), py::arg("nbytes"), py::arg("src_pinned") = true)
      .def("done", &k2sys::CpuOnloader::done)
      .def("wait", &k2sys::CpuOnloader::wait, py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &k2sys::CpuOnloader::synchronize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("chunk_bytes", &k2sys::CpuOnloader::chunk_bytes)
      .def_property_readonly("ring", &k2sys::CpuOnloader::ring)
      .def_property_readonly("threads", &k2sys::CpuOnloader::threads);
}
