// cuDNN convolutions for the CUDA backend (host-only header), where the build found cuDNN
// (PIPAR_HAS_CUDNN): FP32 with FMA math only (no TF32 tensor-core rounding, so results stay within
// the CPU backend's tolerances), one cuDNN handle per stream, workspace from the stream's scratch.
// Only deterministic algorithms are offered (the backward-data algorithm 0 and backward-filter 0 and 3
// accumulate with atomics): the runtime's bitwise guarantees (lanes, resumed runs) hold on CUDA too.
// Verified on an H200 with cuDNN 9.19 (OpsCuda.VendorAndAutoKernelsMatchCpu).
#pragma once
#include <vector>

#include "kernels/ops.h"

namespace pipar::kernels::cuda {

enum class ConvPass { kForward, kBackwardInput, kBackwardWeight };

bool cudnn_built();
// The cuDNN algorithms able to run this pass on these shapes with at most 256 MiB of workspace
// (empty where the build has no cuDNN or no device is usable).
std::vector<int> cudnn_conv_algos(ConvPass pass, const Conv2dParams& p, Shape4 x, Shape4 w);
// y = conv(x, w) + beta * y (beta 1: onto a bias the caller broadcast into y first).
void cudnn_conv_forward(int algo, const Conv2dParams& p, ConstView x, ConstView w, float beta, View y, StreamRef s);
void cudnn_conv_backward_input(int algo, const Conv2dParams& p, ConstView dy, ConstView w, View dx, StreamRef s);  // overwrites
void cudnn_conv_backward_weight(int algo, const Conv2dParams& p, ConstView x, ConstView dy, View dw, StreamRef s);  // accumulates
// cuDNN's version (cudnnGetVersion), 0 without cuDNN.
long cudnn_version();
void release_cudnn_handle(StreamRef s) noexcept;

}  // namespace pipar::kernels::cuda
