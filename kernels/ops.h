// THE op interface. Each op has a param struct (where it needs one), shape logic shared by every
// backend (shapes.cpp), a dispatching entry point here that checks shapes and devices and switches on
// the device, and per-backend implementations in namespaces cpu:: (kernels/cpu/) and cuda::
// (kernels/cuda/, same names, stream last). This header includes no CUDA header.
//
// Conventions, for every op:
//  - Outputs are overwritten, except parameter gradients (dw, db, dgamma, dbeta), which ACCUMULATE
//    (+=) so that micro-batch gradients sum into one batch gradient; zero them before a batch.
//  - Optional inputs (a bias) are passed as an empty view ({}), meaning "absent".
//  - All views of one call live on one device; a mismatch throws pipar::Error.
//  - Shape mismatches throw pipar::ShapeError naming the op and the shapes.
#pragma once
#include <cstdint>

#include "kernels/error.h"
#include "kernels/rng.h"
#include "kernels/stream_ref.h"
#include "kernels/tensor_view.h"

namespace pipar::kernels {

// --- parameters -----------------------------------------------------------------------------------

struct Conv2dParams {
  int kh = 3, kw = 3;  // kernel
  int sh = 1, sw = 1;  // stride
  int ph = 0, pw = 0;  // zero padding
  int groups = 1;      // groups == in channels == out channels: depthwise
};

struct Pool2dParams {
  int kh = 2, kw = 2;
  int sh = 2, sw = 2;
  int ph = 0, pw = 0;  // max-pool pads with -inf; avg-pool counts padded zeros (PyTorch's default)
};

struct BatchNormParams {
  float eps = 1e-5f;
  float momentum = 0.1f;  // running = (1-momentum)*running + momentum*batch (PyTorch convention)
};

struct SgdParams {
  float lr = 0.01f;
  float momentum = 0.9f;
  float weight_decay = 0.0f;
  // PyTorch semantics: g += wd*p; buf = momentum*buf + g; p -= lr*buf (buf starts at zero).
};

// --- shape logic (shapes.cpp), shared by every backend; each validates and throws ShapeError -------

// x [n,c,h,w], w [k, c/groups, kh, kw] → y [n, k, oh, ow]
Shape4 conv2d_out_shape(Shape4 x, Shape4 w, const Conv2dParams& p);
// x [n, in...] (in = c*h*w), w [out, in, 1, 1] → y [n, out, 1, 1]. Grouped (groups > 1): x [n,
// groups*in...], w [groups*out, in, 1, 1] → y [n, groups*out, 1, 1].
Shape4 linear_out_shape(Shape4 x, Shape4 w, int groups = 1);
Shape4 pool2d_out_shape(Shape4 x, const Pool2dParams& p);
int64_t conv2d_flops(Shape4 x, Shape4 w, const Conv2dParams& p);  // forward multiply-adds * 2

// --- convolution ----------------------------------------------------------------------------------
// b: bias [k] or empty.
void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y, StreamRef s = {});
// dx = conv_transpose(dy, w)    (overwrites dx)
void conv2d_backward_input(const Conv2dParams& p, ConstView dy, ConstView w, View dx, StreamRef s = {});
// dw += correlate(x, dy)
void conv2d_backward_weight(const Conv2dParams& p, ConstView x, ConstView dy, View dw, StreamRef s = {});
// db[k] += sum over n,h,w of dy[n,k,h,w]
void conv2d_backward_bias(ConstView dy, View db, StreamRef s = {});

// --- fully connected: y = x W^T + b ----------------------------------------------------------------
void linear_forward(ConstView x, ConstView w, ConstView b, View y, StreamRef s = {});
void linear_backward_input(ConstView dy, ConstView w, View dx, StreamRef s = {});      // dx = dy W
void linear_backward_weight(ConstView x, ConstView dy, View dw, StreamRef s = {});     // dw += dy^T x
void linear_backward_bias(ConstView dy, View db, StreamRef s = {});                    // db += sum_n dy
// Grouped: `groups` dense layers side by side in one call (replicas stacked along the features,
// runtime/replica_stack.h). Group g maps features [g*in, (g+1)*in) of every sample to outputs
// [g*out, (g+1)*out) with rows [g*out, (g+1)*out) of w [groups*out, in, 1, 1] (one batched GEMM per
// pass). groups == 1 is the plain layer above. The bias gradient is linear_backward_bias's.
void grouped_linear_forward(int groups, ConstView x, ConstView w, ConstView b, View y, StreamRef s = {});
void grouped_linear_backward_input(int groups, ConstView dy, ConstView w, View dx, StreamRef s = {});
void grouped_linear_backward_weight(int groups, ConstView x, ConstView dy, View dw, StreamRef s = {});

// --- activations (x and y may alias) ----------------------------------------------------------------
void relu_forward(ConstView x, View y, StreamRef s = {});
void relu_backward(ConstView y, ConstView dy, View dx, StreamRef s = {});  // uses the OUTPUT y
void hardswish_forward(ConstView x, View y, StreamRef s = {});             // x * relu6(x+3)/6
void hardswish_backward(ConstView x, ConstView dy, View dx, StreamRef s = {});
void hardsigmoid_forward(ConstView x, View y, StreamRef s = {});           // relu6(x+3)/6
void hardsigmoid_backward(ConstView x, ConstView dy, View dx, StreamRef s = {});

// --- pooling ---------------------------------------------------------------------------------------
// argmax holds, per output element, the flat index (h*W + w) of the chosen input within its plane.
void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax, StreamRef s = {});
void max_pool2d_backward(const Pool2dParams& p, ConstView dy, ConstIndexView argmax, View dx, StreamRef s = {});
void avg_pool2d_forward(const Pool2dParams& p, ConstView x, View y, StreamRef s = {});
void avg_pool2d_backward(const Pool2dParams& p, ConstView dy, View dx, StreamRef s = {});
// y [n,c,1,1] = mean over h,w of x [n,c,h,w]
void global_avg_pool_forward(ConstView x, View y, StreamRef s = {});
void global_avg_pool_backward(ConstView dy, View dx, StreamRef s = {});

// --- batch normalization (per channel; gamma, beta, running and saved stats are vectors of c) -------
// Training: normalizes with the batch statistics, updates the running ones (unbiased variance),
// and saves the batch mean and 1/sqrt(var+eps) for the backward pass.
void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd,
                              View y, StreamRef s = {});
void batch_norm_forward_inference(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                                  ConstView running_mean, ConstView running_var, View y, StreamRef s = {});
// dx overwritten; dgamma, dbeta accumulate.
void batch_norm_backward(ConstView x, ConstView dy, ConstView gamma, ConstView save_mean,
                         ConstView save_invstd, View dx, View dgamma, View dbeta, StreamRef s = {});

// --- element-wise and channel-wise ----------------------------------------------------------------
void add_forward(ConstView a, ConstView b, View y, StreamRef s = {});  // y = a + b (may alias)
// y[n,c,h,w] = x[n,c,h,w] * scale[n,c]   (squeeze-excite); scale is [n,c,1,1]
void channel_mul_forward(ConstView x, ConstView scale, View y, StreamRef s = {});
// dx = dy * scale (overwrites); dscale[n,c] = sum_hw dy*x (overwrites)
void channel_mul_backward(ConstView x, ConstView scale, ConstView dy, View dx, View dscale, StreamRef s = {});
void axpy(float alpha, ConstView x, View y, StreamRef s = {});  // y += alpha * x
void scale(float alpha, View x, StreamRef s = {});              // x *= alpha
void fill(float value, View x, StreamRef s = {});
void copy(ConstView x, View y, StreamRef s = {});               // same numel; shapes may differ

// --- dropout: mask[i] = 0 or 1/(1-p), from a counter-based RNG (seed, i), so any backend agrees ------
void dropout_forward(float p, uint64_t seed, ConstView x, View y, View mask, StreamRef s = {});
void dropout_backward(ConstView mask, ConstView dy, View dx, StreamRef s = {});

// --- softmax cross-entropy over logits [n, k] with int labels [n] ----------------------------------
// probs [n,k] = softmax(logits); losses [n] = -log probs[label]. A label outside [0,k) throws.
void softmax_cross_entropy_forward(ConstView logits, ConstIndexView labels, View probs, View losses,
                                   StreamRef s = {});
// dlogits = scale * (probs - onehot(labels)); scale = 1/batch for the mean loss, or a micro-batch's
// share of it so that summed micro-batch gradients equal the batch gradient.
void softmax_cross_entropy_backward(ConstView probs, ConstIndexView labels, float scale, View dlogits,
                                    StreamRef s = {});

// --- optimizer ------------------------------------------------------------------------------------
void sgd_step(const SgdParams& p, View param, ConstView grad, View momentum_buf, StreamRef s = {});

// --- layer shapes, for benchmarks --------------------------------------------------------------
// While a recorder is set on a thread, every conv2d_forward and linear_forward that thread calls (on
// any backend) reports its shapes first: bench/ replays the layers of a real model's part this way.
struct LayerShape {
  bool conv = false;
  Conv2dParams p;  // conv only
  Shape4 x, w;
  bool bias = false;
};
using ShapeRecorder = void (*)(const LayerShape&, void* user);
void set_shape_recorder(ShapeRecorder r, void* user);  // thread-local; null stops recording

// --- backends -------------------------------------------------------------------------------------
// Per-backend implementations: same names and argument order, without the stream on CPU.
namespace cpu {
void conv2d_forward(const Conv2dParams& p, ConstView x, ConstView w, ConstView b, View y);
void conv2d_backward_input(const Conv2dParams& p, ConstView dy, ConstView w, View dx);
void conv2d_backward_weight(const Conv2dParams& p, ConstView x, ConstView dy, View dw);
void conv2d_backward_bias(ConstView dy, View db);
void linear_forward(int groups, ConstView x, ConstView w, ConstView b, View y);  // groups: ops.h's grouped_linear_*
void linear_backward_input(int groups, ConstView dy, ConstView w, View dx);
void linear_backward_weight(int groups, ConstView x, ConstView dy, View dw);
void linear_backward_bias(ConstView dy, View db);
void relu_forward(ConstView x, View y);
void relu_backward(ConstView y, ConstView dy, View dx);
void hardswish_forward(ConstView x, View y);
void hardswish_backward(ConstView x, ConstView dy, View dx);
void hardsigmoid_forward(ConstView x, View y);
void hardsigmoid_backward(ConstView x, ConstView dy, View dx);
void max_pool2d_forward(const Pool2dParams& p, ConstView x, View y, IndexView argmax);
void max_pool2d_backward(const Pool2dParams& p, ConstView dy, ConstIndexView argmax, View dx);
void avg_pool2d_forward(const Pool2dParams& p, ConstView x, View y);
void avg_pool2d_backward(const Pool2dParams& p, ConstView dy, View dx);
void global_avg_pool_forward(ConstView x, View y);
void global_avg_pool_backward(ConstView dy, View dx);
void batch_norm_forward_train(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                              View running_mean, View running_var, View save_mean, View save_invstd, View y);
void batch_norm_forward_inference(const BatchNormParams& p, ConstView x, ConstView gamma, ConstView beta,
                                  ConstView running_mean, ConstView running_var, View y);
void batch_norm_backward(ConstView x, ConstView dy, ConstView gamma, ConstView save_mean,
                         ConstView save_invstd, View dx, View dgamma, View dbeta);
void add_forward(ConstView a, ConstView b, View y);
void channel_mul_forward(ConstView x, ConstView scale, View y);
void channel_mul_backward(ConstView x, ConstView scale, ConstView dy, View dx, View dscale);
void axpy(float alpha, ConstView x, View y);
void scale(float alpha, View x);
void fill(float value, View x);
void copy(ConstView x, View y);
void dropout_forward(float p, uint64_t seed, ConstView x, View y, View mask);
void dropout_backward(ConstView mask, ConstView dy, View dx);
void softmax_cross_entropy_forward(ConstView logits, ConstIndexView labels, View probs, View losses);
void softmax_cross_entropy_backward(ConstView probs, ConstIndexView labels, float scale, View dlogits);
void sgd_step(const SgdParams& p, View param, ConstView grad, View momentum_buf);

// The packed, cache-blocked GEMM under convolution and linear layers (row-major, leading dims):
// C[m,n] = alpha * op(A)[m,k] * op(B)[k,n] + beta * C. Multithreaded over the process thread count.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
}  // namespace cpu

}  // namespace pipar::kernels
