// CUDA fully connected layer, y = x W^T + b, through the GEMM of gemm.cu (handwritten tiled kernel or
// cuBLAS, per set_gemm_backend): the bias is broadcast into y first and the GEMM accumulates onto it.
// Checked only in a CPU emulation (blocks run as std::threads with barriers; handwritten kernels
// against the CPU backend, guard elements intact). NOT verified on a GPU: results against the CPU and speed.
#include "kernels/cuda/kernel_util.cuh"
#include "kernels/cuda/ops_cuda.h"

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
// x [n, in] (in = c*h*w), w [out, in], y and dy [n, out].

void linear_forward(ConstView x, ConstView w, ConstView b, View y, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "linear_forward");
  const int64_t n = x.shape.n, in = x.shape.per_sample(), out = w.shape.n;
  if (b.data) linear_bias_broadcast(b.data, y.data, n, out, st);
  gemm(false, true, n, out, in, 1.0f, x.data, in, w.data, in, b.data ? 1.0f : 0.0f, y.data, out, s);
}

void linear_backward_input(ConstView dy, ConstView w, View dx, StreamRef s) {
  checked_stream(s, "linear_backward_input");
  const int64_t n = dx.shape.n, in = dx.shape.per_sample(), out = w.shape.n;
  gemm(false, false, n, in, out, 1.0f, dy.data, out, w.data, in, 0.0f, dx.data, in, s);  // dx = dy W
}

void linear_backward_weight(ConstView x, ConstView dy, View dw, StreamRef s) {
  checked_stream(s, "linear_backward_weight");
  const int64_t n = x.shape.n, in = x.shape.per_sample(), out = dw.shape.n;
  gemm(true, false, out, in, n, 1.0f, dy.data, out, x.data, in, 1.0f, dw.data, in, s);  // dw += dy^T x
}

void linear_backward_bias(ConstView dy, View db, StreamRef s) {
  const cudaStream_t st = checked_stream(s, "linear_backward_bias");
  channel_sum_accumulate(dy.data, db.data, dy.shape.n, dy.shape.per_sample(), 1, st);  // db += sum_n dy
}

}  // namespace pipar::kernels::cuda
