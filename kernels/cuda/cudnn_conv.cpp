// cuDNN convolutions (cudnn_conv.h): the legacy convolution API of cuDNN 9 (deprecated there in favour
// of the graph API, which takes several times the code for the same three calls), descriptors built
// per call (microseconds against the convolution), handles cached per stream like cuBLAS's.
// Verified on an H200 with cuDNN 9.19 (OpsCuda.VendorAndAutoKernelsMatchCpu).
#include "kernels/cuda/cudnn_conv.h"

#include "kernels/error.h"

#if PIPAR_HAS_CUDNN
#include <cudnn.h>

#include <mutex>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/stream.h"
#include "kernels/cuda/stream_handles.h"
#endif

namespace pipar::kernels::cuda {

#if PIPAR_HAS_CUDNN
namespace {

constexpr size_t kMaxWorkspace = size_t{256} << 20;

[[noreturn]] void throw_cudnn(cudnnStatus_t st, const char* expr, const char* what) {
  throw Error(detail::concat("cuDNN ", what, ": ", expr, " failed: ", cudnnGetErrorString(st)));
}
#define PIPAR_CUDNN_CHECK(expr, what)                             \
  do {                                                            \
    cudnnStatus_t pipar_st_ = (expr);                             \
    if (pipar_st_ != CUDNN_STATUS_SUCCESS) throw_cudnn(pipar_st_, #expr, what); \
  } while (0)

// Leaked on purpose, as cuBLAS's (no cudnnDestroy during static destruction).
StreamHandles<cudnnHandle_t>& handles() {
  static auto* h = new StreamHandles<cudnnHandle_t>();
  return *h;
}

cudnnHandle_t handle(StreamRef s) {
  return handles().get(s, [&] {
    cudnnHandle_t h = nullptr;
    PIPAR_CUDNN_CHECK(cudnnCreate(&h), "handle");
    const cudnnStatus_t st = cudnnSetStream(h, native(s));
    if (st != CUDNN_STATUS_SUCCESS) {
      cudnnDestroy(h);
      throw_cudnn(st, "cudnnSetStream", "handle");
    }
    return h;
  });
}

// The descriptors of one convolution: x [n, c, h, w], w [k, c/groups, kh, kw], y [n, k, oh, ow].
struct Descriptors {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;
  Descriptors(const Conv2dParams& p, Shape4 xs, Shape4 ws) {
    const Shape4 ys = conv2d_out_shape(xs, ws, p);
    try {
      PIPAR_CUDNN_CHECK(cudnnCreateTensorDescriptor(&x), "descriptor");
      PIPAR_CUDNN_CHECK(cudnnCreateTensorDescriptor(&y), "descriptor");
      PIPAR_CUDNN_CHECK(cudnnCreateFilterDescriptor(&w), "descriptor");
      PIPAR_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv), "descriptor");
      auto i = [](int64_t v) { return static_cast<int>(v); };
      PIPAR_CUDNN_CHECK(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, i(xs.n), i(xs.c), i(xs.h), i(xs.w)),
                        "x descriptor");
      PIPAR_CUDNN_CHECK(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, CUDNN_DATA_FLOAT, i(ys.n), i(ys.c), i(ys.h), i(ys.w)),
                        "y descriptor");
      PIPAR_CUDNN_CHECK(cudnnSetFilter4dDescriptor(w, CUDNN_DATA_FLOAT, CUDNN_TENSOR_NCHW, i(ws.n), i(ws.c), i(ws.h), i(ws.w)),
                        "filter descriptor");
      PIPAR_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(conv, p.ph, p.pw, p.sh, p.sw, 1, 1, CUDNN_CROSS_CORRELATION,
                                                        CUDNN_DATA_FLOAT),
                        "convolution descriptor");
      PIPAR_CUDNN_CHECK(cudnnSetConvolutionGroupCount(conv, p.groups), "convolution groups");
      PIPAR_CUDNN_CHECK(cudnnSetConvolutionMathType(conv, CUDNN_FMA_MATH), "math type");
    } catch (...) {
      release();
      throw;
    }
  }
  ~Descriptors() { release(); }
  Descriptors(const Descriptors&) = delete;
  Descriptors& operator=(const Descriptors&) = delete;
  void release() noexcept {
    if (x) cudnnDestroyTensorDescriptor(x);
    if (y) cudnnDestroyTensorDescriptor(y);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
    x = y = nullptr, w = nullptr, conv = nullptr;
  }
};

bool deterministic(ConvPass pass, int algo) {
  if (pass == ConvPass::kBackwardInput) return algo != CUDNN_CONVOLUTION_BWD_DATA_ALGO_0;
  if (pass == ConvPass::kBackwardWeight)
    return algo != CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 && algo != CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3;
  return true;
}

size_t workspace_bytes(cudnnHandle_t h, ConvPass pass, const Descriptors& d, int algo, cudnnStatus_t* st) {
  size_t bytes = 0;
  switch (pass) {
    case ConvPass::kForward:
      *st = cudnnGetConvolutionForwardWorkspaceSize(h, d.x, d.w, d.conv, d.y, static_cast<cudnnConvolutionFwdAlgo_t>(algo),
                                                    &bytes);
      break;
    case ConvPass::kBackwardInput:
      *st = cudnnGetConvolutionBackwardDataWorkspaceSize(h, d.w, d.y, d.conv, d.x,
                                                         static_cast<cudnnConvolutionBwdDataAlgo_t>(algo), &bytes);
      break;
    case ConvPass::kBackwardWeight:
      *st = cudnnGetConvolutionBackwardFilterWorkspaceSize(h, d.x, d.y, d.conv, d.w,
                                                           static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo), &bytes);
      break;
  }
  return bytes;
}

void* workspace(cudnnHandle_t h, ConvPass pass, const Descriptors& d, int algo, StreamRef s, size_t* bytes) {
  cudnnStatus_t st = CUDNN_STATUS_SUCCESS;
  *bytes = workspace_bytes(h, pass, d, algo, &st);
  if (st != CUDNN_STATUS_SUCCESS) throw_cudnn(st, "workspace size", "convolution");
  return *bytes ? stream_workspace(s, *bytes) : nullptr;
}

}  // namespace

bool cudnn_built() { return true; }

long cudnn_version() { return static_cast<long>(cudnnGetVersion()); }

std::vector<int> cudnn_conv_algos(ConvPass pass, const Conv2dParams& p, Shape4 x, Shape4 w) {
  std::vector<int> out;
  int dev_count = 0;
  if (cudaGetDeviceCount(&dev_count) != cudaSuccess || dev_count == 0) {
    cudaGetLastError();
    return out;
  }
  // A handle of its own for the query (no stream needed to ask for workspace sizes), used by one
  // thread at a time (a cuDNN handle is not for concurrent use).
  static std::mutex query_mutex;
  std::lock_guard<std::mutex> lock(query_mutex);
  static cudnnHandle_t query = [] {
    cudnnHandle_t h = nullptr;
    PIPAR_CUDNN_CHECK(cudnnCreate(&h), "handle");
    return h;
  }();
  Descriptors d(p, x, w);
  const int count = pass == ConvPass::kForward         ? static_cast<int>(CUDNN_CONVOLUTION_FWD_ALGO_COUNT)
                    : pass == ConvPass::kBackwardInput ? static_cast<int>(CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT)
                                                       : static_cast<int>(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT);
  for (int a = 0; a < count; ++a) {
    if (!deterministic(pass, a)) continue;
    cudnnStatus_t st = CUDNN_STATUS_SUCCESS;
    const size_t bytes = workspace_bytes(query, pass, d, a, &st);
    if (st == CUDNN_STATUS_SUCCESS && bytes <= kMaxWorkspace) out.push_back(a);
  }
  return out;
}

void cudnn_conv_forward(int algo, const Conv2dParams& p, ConstView x, ConstView w, float beta, View y, StreamRef s) {
  cudnnHandle_t h = handle(s);
  Descriptors d(p, x.shape, w.shape);
  size_t bytes = 0;
  void* ws = workspace(h, ConvPass::kForward, d, algo, s, &bytes);
  const float alpha = 1.0f;
  PIPAR_CUDNN_CHECK(cudnnConvolutionForward(h, &alpha, d.x, x.data, d.w, w.data, d.conv,
                                            static_cast<cudnnConvolutionFwdAlgo_t>(algo), ws, bytes, &beta, d.y, y.data),
                    "conv2d_forward");
}

void cudnn_conv_backward_input(int algo, const Conv2dParams& p, ConstView dy, ConstView w, View dx, StreamRef s) {
  cudnnHandle_t h = handle(s);
  Descriptors d(p, dx.shape, w.shape);
  size_t bytes = 0;
  void* ws = workspace(h, ConvPass::kBackwardInput, d, algo, s, &bytes);
  const float alpha = 1.0f, beta = 0.0f;
  PIPAR_CUDNN_CHECK(cudnnConvolutionBackwardData(h, &alpha, d.w, w.data, d.y, dy.data, d.conv,
                                                 static_cast<cudnnConvolutionBwdDataAlgo_t>(algo), ws, bytes, &beta, d.x,
                                                 dx.data),
                    "conv2d_backward_input");
}

void cudnn_conv_backward_weight(int algo, const Conv2dParams& p, ConstView x, ConstView dy, View dw, StreamRef s) {
  cudnnHandle_t h = handle(s);
  Descriptors d(p, x.shape, dw.shape);
  size_t bytes = 0;
  void* ws = workspace(h, ConvPass::kBackwardWeight, d, algo, s, &bytes);
  const float alpha = 1.0f, beta = 1.0f;  // dw += (accumulated over micro-batches)
  PIPAR_CUDNN_CHECK(cudnnConvolutionBackwardFilter(h, &alpha, d.x, x.data, d.y, dy.data, d.conv,
                                                   static_cast<cudnnConvolutionBwdFilterAlgo_t>(algo), ws, bytes, &beta,
                                                   d.w, dw.data),
                    "conv2d_backward_weight");
}

void release_cudnn_handle(StreamRef s) noexcept {
  handles().release(s, [](cudnnHandle_t h) { cudnnDestroy(h); });
}

#else  // no cuDNN in this build: the vendor's convolution is cuBLAS on im2col

bool cudnn_built() { return false; }
long cudnn_version() { return 0; }
std::vector<int> cudnn_conv_algos(ConvPass, const Conv2dParams&, Shape4, Shape4) { return {}; }
void cudnn_conv_forward(int, const Conv2dParams&, ConstView, ConstView, float, View, StreamRef) {
  throw Unsupported("conv2d_forward: this build has no cuDNN");
}
void cudnn_conv_backward_input(int, const Conv2dParams&, ConstView, ConstView, View, StreamRef) {
  throw Unsupported("conv2d_backward_input: this build has no cuDNN");
}
void cudnn_conv_backward_weight(int, const Conv2dParams&, ConstView, ConstView, View, StreamRef) {
  throw Unsupported("conv2d_backward_weight: this build has no cuDNN");
}
void release_cudnn_handle(StreamRef) noexcept {}

#endif

}  // namespace pipar::kernels::cuda
