// The CUDA backend of ops.h: the same names and argument order as namespace cpu, plus a trailing
// StreamRef (never null: CUDA ops refuse the default stream). Every op only enqueues work on `s`; none
// synchronizes or allocates with cudaMalloc (scratch comes from the stream's workspace, stream.h).
// Host-only header (no CUDA include): dispatch.cpp and the tests include it.
// Conv and linear layers pick their implementation per shape and pass (autotune.h: hand-written,
// cuBLAS or cuDNN, under kernel_choice()).
#pragma once
#include <cstdint>

#include "kernels/ops.h"

namespace pipar::kernels::cuda {

// --- GEMM backends --------------------------------------------------------------------------------
// kHandwritten: our shared-memory tiled, register-blocked kernel (gemm.cu). kCublas: cublasSgemm /
// cublasSgemmStridedBatched on the op's stream, FP32 math (TF32 off). Conv and linear use whichever is
// selected. The initial choice comes from the environment variable PIPAR_GEMM_BACKEND
// ("handwritten" or "cublas"; anything else or unset: handwritten). Process-wide, thread-safe.
enum class GemmBackend { kHandwritten, kCublas };
void set_gemm_backend(GemmBackend b);
GemmBackend gemm_backend();  // this thread's ScopedGemmBackend if one is alive, else the process-wide one
const char* gemm_backend_name(GemmBackend b);
// Overrides the process-wide backend on this thread while alive (the autotuner's per-layer choice).
class ScopedGemmBackend {
 public:
  explicit ScopedGemmBackend(GemmBackend b);
  ~ScopedGemmBackend();
  ScopedGemmBackend(const ScopedGemmBackend&) = delete;
  ScopedGemmBackend& operator=(const ScopedGemmBackend&) = delete;

 private:
  int prev_;
};

// How the hand-written path shapes its work. kAuto: per GEMM the 64x64 or the 128x128 tile
// (gemm_kernels.cuh's plan_gemm), and a convolution's samples side by side as columns where its
// output is small (fold_samples_as_columns). kBaseline: the 64x64 tile everywhere and one GEMM per
// sample, as measured on the H200 before those two (bench/RESULTS.md); for A/B benchmarks. kLarge:
// as kAuto but the 128x128 tile everywhere (the GPU tests run that kernel on every shape). Initial
// value: PIPAR_GEMM_PLANNING ("baseline" or "large"; anything else or unset: auto). Process-wide,
// thread-safe.
enum class GemmPlanning { kAuto, kBaseline, kLarge };
void set_gemm_planning(GemmPlanning p);
GemmPlanning gemm_planning();
const char* gemm_planning_name(GemmPlanning p);

// Row-major C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C (device pointers, leading dims in
// elements). beta == 0 overwrites C without reading it (NaN in C does not propagate).
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc, StreamRef s);
// `batch` independent GEMMs; matrix i starts at a + i*stride_a (likewise b, c). stride_a may be 0.
void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                          int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta,
                          float* c, int64_t ldc, int64_t stride_c, int64_t batch, StreamRef s);
// outer x inner independent GEMMs in one call: matrix (o, i) of A starts at a + o*a_outer + i*a_inner
// (likewise b, c); a convolution's samples by its groups. The hand-written kernel runs them all in one
// grid; cuBLAS loops a strided-batched call over the larger count along the smaller.
void gemm_batched_2d(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, int64_t a_outer, int64_t a_inner, const float* b, int64_t ldb, int64_t b_outer,
                     int64_t b_inner, float beta, float* c, int64_t ldc, int64_t c_outer, int64_t c_inner,
                     int64_t outer, int64_t inner, StreamRef s);

// --- ops (semantics: ops.h and the cpu:: implementations) ------------------------------------------
void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y, StreamRef s);
void conv2d_backward_input(const Conv2dParams& p, ConstView dy, ConstView w, View dx, StreamRef s);
void conv2d_backward_weight(const Conv2dParams& p, ConstView x, ConstView dy, View dw, StreamRef s);
void conv2d_backward_bias(ConstView dy, View db, StreamRef s);
void linear_forward(int groups, ConstView x, ConstView w, ConstView b, View y, StreamRef s);
void linear_backward_input(int groups, ConstView dy, ConstView w, View dx, StreamRef s);
void linear_backward_weight(int groups, ConstView x, ConstView dy, View dw, StreamRef s);
void linear_backward_bias(ConstView dy, View db, StreamRef s);
void relu_forward(ConstView x, View y, StreamRef s);
void relu_backward(ConstView y, ConstView dy, View dx, StreamRef s);
void hardswish_forward(ConstView x, View y, StreamRef s);
void hardswish_backward(ConstView x, ConstView dy, View dx, StreamRef s);
void hardsigmoid_forward(ConstView x, View y, StreamRef s);
void hardsigmoid_backward(ConstView x, ConstView dy, View dx, StreamRef s);
void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax, StreamRef s);
void max_pool2d_backward(const Pool2dParams& p, ConstView dy, ConstIndexView argmax, View dx, StreamRef s);
void avg_pool2d_forward(const Pool2dParams& p, ConstView x, View y, StreamRef s);
void avg_pool2d_backward(const Pool2dParams& p, ConstView dy, View dx, StreamRef s);
void global_avg_pool_forward(ConstView x, View y, StreamRef s);
void global_avg_pool_backward(ConstView dy, View dx, StreamRef s);
void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd, View y,
                              StreamRef s);
void batch_norm_forward_inference(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                                  ConstView running_mean, ConstView running_var, View y, StreamRef s);
void batch_norm_backward(ConstView x, ConstView dy, ConstView gamma, ConstView save_mean, ConstView save_invstd,
                         View dx, View dgamma, View dbeta, StreamRef s);
void add_forward(ConstView a, ConstView b, View y, StreamRef s);
void channel_mul_forward(ConstView x, ConstView scale, View y, StreamRef s);
void channel_mul_backward(ConstView x, ConstView scale, ConstView dy, View dx, View dscale, StreamRef s);
void axpy(float alpha, ConstView x, View y, StreamRef s);
void scale(float alpha, View x, StreamRef s);
void fill(float value, View x, StreamRef s);
void copy(ConstView x, View y, StreamRef s);
void dropout_forward(float p, uint64_t seed, ConstView x, View y, View mask, StreamRef s);
void dropout_backward(ConstView mask, ConstView dy, View dx, StreamRef s);
// Labels are NOT validated here (a kernel cannot throw and a check would need a sync): the caller
// validates them on the host (the runtime does when it gathers a batch). The kernels never index out
// of bounds: a sample whose label is outside [0,k) gets loss NaN and dlogits = scale*probs.
void softmax_cross_entropy_forward(ConstView logits, ConstIndexView labels, View probs, View losses, StreamRef s);
void softmax_cross_entropy_backward(ConstView probs, ConstIndexView labels, float scale, View dlogits, StreamRef s);
void sgd_step(const SgdParams& p, View param, ConstView grad, View momentum_buf, StreamRef s);

}  // namespace pipar::kernels::cuda
