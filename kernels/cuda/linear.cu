// CUDA fully connected layer, y = x W^T + b, through the GEMM of gemm.cu (handwritten tiled kernel or
// cuBLAS, per shape as the autotuner picks): the bias is broadcast into y first and the GEMM
// accumulates onto it.
// Verified on an H200 (OpsCuda.LinearMatchesCpu, grouped too; speeds in bench/RESULTS.md).
#include <string>
#include <vector>

#include "kernels/cuda/autotune.h"
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/runtime_cuda.h"

namespace pipar::kernels::cuda {
namespace {

// --- kernels --------------------------------------------------------------------------------------

// y[r, o] = b[o] for every row r of y [rows, out].
__global__ void linear_bias_broadcast_kernel(const float* __restrict__ b, float* __restrict__ y, int64_t total,
                                             int64_t out) {
  for (int64_t i = global_index(); i < total; i += grid_stride()) y[i] = b[i % out];
}

// --- launchers ------------------------------------------------------------------------------------

void linear_bias_broadcast(const float* b, float* y, int64_t rows, int64_t out, cudaStream_t s) {
  const int64_t total = rows * out;
  if (total == 0) return;
  linear_bias_broadcast_kernel<<<grid_1d(total), kThreads, 0, s>>>(b, y, total, out);
  PIPAR_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

// --- entry points ---------------------------------------------------------------------------------
// x [n, in] (in = c*h*w), w [out, in], y and dy [n, out]. Each pass runs through our GEMM or cuBLAS,
// as the autotuner picks per shape (autotune.h; vendor = cuBLAS); under kernel_choice() ==
// kHandwritten, through the process-wide GEMM backend.

namespace {

std::string linear_key(const char* pass, int groups, int64_t n, int64_t in, int64_t out, bool bias) {
  return detail::concat("linear.", pass, "|n=", n, "|in=", in, "|out=", out, "|b=", bias ? 1 : 0,
                        groups > 1 ? detail::concat("|g=", groups) : std::string());
}

// Runs `pass(out)` under the implementation chosen for `key`; `trial()` is where the autotuner's runs
// may write (the real output, or scratch for an accumulating pass).
template <class Pass, class Trial>
void run_linear(const std::string& key, StreamRef s, Trial&& trial, Pass&& pass, float* real) {
  Impl impl;
  if (kernel_choice() != KernelChoice::kHandwritten)
    impl = choose(
        key, [] { return std::vector<Impl>{Impl{Impl::kHandwritten, -1}, Impl{Impl::kCublas, -1}}; },
        [&](const Impl& i) { with_gemm(i, [&] { pass(trial()); }); }, s);
  with_gemm(impl, [&] { pass(real); });
}

}  // namespace

// Grouped (groups > 1, ops.h's grouped_linear_*): one strided-batched GEMM over the groups, whose
// features, outputs and weight rows lie at g*in, g*out and g*out*in (leading dims groups*in, groups*out).
void linear_forward(int groups, ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "linear_forward");
  const int64_t n = x.shape.n, in = w.shape.c, out = w.shape.n / groups, ld_x = in * groups, ld_y = out * groups;
  auto pass = [&](float* dst) {
    if (b.data) linear_bias_broadcast(b.data, dst, n, ld_y, st);
    gemm_strided_batched(false, true, n, out, in, 1.0f, x.data, ld_x, in, w.data, in, out * in, b.data ? 1.0f : 0.0f,
                         dst, ld_y, out, groups, s);
  };
  run_linear(linear_key("fwd", groups, n, in, out, b.data != nullptr), s, [&] { return y.data; }, pass, y.data);
}

void linear_backward_input(int groups, ConstView dy, ConstView w, View dx, StreamRef s) {
  checked_stream(s, "linear_backward_input");
  const int64_t n = dx.shape.n, in = w.shape.c, out = w.shape.n / groups, ld_x = in * groups, ld_y = out * groups;
  auto pass = [&](float* dst) {  // dx_g = dy_g W_g
    gemm_strided_batched(false, false, n, in, out, 1.0f, dy.data, ld_y, out, w.data, in, out * in, 0.0f, dst, ld_x, in,
                         groups, s);
  };
  run_linear(linear_key("bwd_x", groups, n, in, out, false), s, [&] { return dx.data; }, pass, dx.data);
}

void linear_backward_weight(int groups, ConstView x, ConstView dy, View dw, StreamRef s) {
  checked_stream(s, "linear_backward_weight");
  const int64_t n = x.shape.n, in = dw.shape.c, out = dw.shape.n / groups, ld_x = in * groups, ld_y = out * groups;
  auto pass = [&](float* dst) {  // dw_g += dy_g^T x_g
    gemm_strided_batched(true, false, out, in, n, 1.0f, dy.data, ld_y, out, x.data, ld_x, in, 1.0f, dst, in, out * in,
                         groups, s);
  };
  TrialScratch scratch(s);  // trial runs accumulate here, not into the gradient
  run_linear(linear_key("bwd_w", groups, n, in, out, false), s, [&] { return scratch.get(dw.numel()); }, pass, dw.data);
}

void linear_backward_bias(ConstView dy, View db, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "linear_backward_bias");
  channel_sum_accumulate(dy.data, db.data, dy.shape.n, dy.shape.per_sample(), 1, st);  // db += sum_n dy
}

}  // namespace pipar::kernels::cuda
