// CUDA backend against the CPU backend, op by op, through the dispatching entry points: fresh random
// inputs (seed printed on failure, PIPAR_TEST_SEED reproduces), odd shapes (1, 3, 17, 33, 257),
// forward and backward, both GEMM backends; small-integer inputs where results must be exact; guard
// elements around every device buffer; two streams against one. Every GPU test starts with
// PIPAR_REQUIRE_CUDA() and skips without a device; the OpsCudaNoDevice tests run anywhere.
// Run on a GPU machine: build/tests/pipar_tests --gtest_filter='*Cuda*'
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/device.h"
#include "kernels/ops.h"
#include "runtime/tensor.h"
#include "tests/gpu.h"
#include "tests/kernels/op_test_util.h"
#include "tests/random.h"
#if PIPAR_HAS_CUDA
#include <unistd.h>

#include <cstdio>

#include "kernels/cuda/autotune.h"
#include "kernels/cuda/ops_cuda.h"
#include "kernels/cuda/stream.h"
#include "kernels/kernel_cache.h"
#endif

namespace pipar::test {
namespace {

// --- no device needed -------------------------------------------------------------------------------

std::string lower(std::string s) {
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// Where no CUDA device is usable, allocating on kCuda throws a pipar::Error naming CUDA (the CUDA
// runtime's message, or "built without CUDA") instead of crashing.
TEST(OpsCudaNoDevice, AllocatingOnCudaThrowsClearError) {
  if (kernels::cuda_available()) GTEST_SKIP() << "a CUDA device is usable; this test covers the no-device path";
  try {
    Tensor t = Tensor::empty({2, 3, 1, 1}, Device::kCuda);
    FAIL() << "Tensor::empty on kCuda without a device should throw";
  } catch (const Error& e) {
    EXPECT_NE(lower(e.what()).find("cuda"), std::string::npos) << e.what();
  }
  EXPECT_THROW(kernels::device_alloc(Device::kCuda, 64), Error);
}

// CUDA ops refuse the default (null) stream before touching memory, on any machine.
TEST(OpsCudaNoDevice, OpOnCudaViewsWithoutStreamThrows) {
  float dummy[4] = {0, 0, 0, 0};  // never dereferenced: the stream check comes first
  const View v{dummy, {1, 4, 1, 1}, Device::kCuda};
  EXPECT_THROW(kernels::relu_forward(v, v), Error);
  EXPECT_THROW(kernels::fill(1.0f, v), Error);
}

#if PIPAR_HAS_CUDA
TEST(OpsCudaNoDevice, StreamWithoutDeviceThrows) {
  if (kernels::cuda_available()) GTEST_SKIP() << "a CUDA device is usable; this test covers the no-device path";
  EXPECT_THROW(kernels::cuda::Stream(), Error);
}
#endif

}  // namespace
}  // namespace pipar::test

#if PIPAR_HAS_CUDA
namespace pipar::test {
namespace {

using kernels::Conv2dParams;
using kernels::Pool2dParams;
using kernels::cuda::GemmBackend;
using kernels::cuda::GemmPlanning;
using kernels::cuda::Stream;

// --- device buffers with guard elements --------------------------------------------------------------

constexpr size_t kGuard = 64;  // elements on each side, checked on every download

template <class T>
constexpr T guard_value() {
  if constexpr (std::is_same_v<T, float>) return -12345.678f;
  else return static_cast<T>(-777777);
}

// Device copy of a host vector with kGuard sentinel elements on each side; download() checks them.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer(const std::vector<T>& host, Shape4 shape, const Stream& s) : n_(host.size()), shape_(shape) {
    EXPECT_EQ(static_cast<int64_t>(n_), shape.numel());
    base_ = static_cast<T*>(kernels::device_alloc(Device::kCuda, sizeof(T) * (n_ + 2 * kGuard)));
    std::vector<T> staged(n_ + 2 * kGuard, guard_value<T>());
    std::copy(host.begin(), host.end(), staged.begin() + kGuard);
    kernels::device_copy(Device::kCuda, base_, Device::kCpu, staged.data(), sizeof(T) * staged.size(), s);
    s.synchronize();  // staged is freed on return
  }
  ~DeviceBuffer() { kernels::device_free(Device::kCuda, base_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  BasicView<T> view() { return {base_ + kGuard, shape_, Device::kCuda}; }
  BasicView<const T> cview() const { return {base_ + kGuard, shape_, Device::kCuda}; }

  // Waits for the stream, copies back and checks that no kernel wrote outside the buffer.
  std::vector<T> download(const Stream& s) const {
    std::vector<T> all(n_ + 2 * kGuard);
    kernels::device_copy(Device::kCpu, all.data(), Device::kCuda, base_, sizeof(T) * all.size(), s);
    s.synchronize();
    for (size_t i = 0; i < kGuard; ++i) {
      if (!(all[i] == guard_value<T>()) || !(all[n_ + kGuard + i] == guard_value<T>())) {
        ADD_FAILURE() << "guard element overwritten around a buffer of " << n_ << " elements";
        break;
      }
    }
    return std::vector<T>(all.begin() + kGuard, all.begin() + kGuard + static_cast<int64_t>(n_));
  }

 private:
  T* base_ = nullptr;
  size_t n_;
  Shape4 shape_;
};

using DevF = DeviceBuffer<float>;
using DevI = DeviceBuffer<int32_t>;

std::vector<float> nans(int64_t n) { return std::vector<float>(static_cast<size_t>(n), NAN); }

// |got - ref| <= rel*max|ref| + rel*|ref|: relative to the output's scale, so that values near zero
// (sums of mixed signs) do not need an absolute tolerance of their own.
::testing::AssertionResult close_to_cpu(const std::vector<float>& got, const std::vector<float>& ref, double rel) {
  double mx = 0;
  for (float r : ref)
    if (std::isfinite(r)) mx = std::max(mx, static_cast<double>(std::fabs(r)));
  return all_close(got, to_double(ref), rel * std::max(mx, 1e-30), rel);
}
::testing::AssertionResult same_as_cpu(const std::vector<float>& got, const std::vector<float>& ref) {
  return all_close(got, to_double(ref), 0.0, 0.0);  // bit for bit (NaN matches NaN)
}

// Conv and linear layers under one kernel choice (the autotuner's vendor or auto, or handwritten),
// restored on scope exit.
class ChoiceGuard {
 public:
  explicit ChoiceGuard(kernels::cuda::KernelChoice c) : saved_(kernels::cuda::kernel_choice()) {
    kernels::cuda::set_kernel_choice(c);
  }
  ~ChoiceGuard() { kernels::cuda::set_kernel_choice(saved_); }

 private:
  kernels::cuda::KernelChoice saved_;
};

// A GEMM backend and, for ours, how it shapes its work (ops_cuda.h's GemmPlanning: by shape, the
// 64x64 tile and a GEMM per sample everywhere, or the 128x128 tile everywhere, so that each kernel
// meets every shape).
struct GemmConfig {
  GemmBackend backend;
  GemmPlanning planning;
  std::string name() const {
    return std::string(kernels::cuda::gemm_backend_name(backend)) +
           (backend == GemmBackend::kHandwritten ? std::string(" ") + kernels::cuda::gemm_planning_name(planning) : "");
  }
};

// One GEMM configuration for conv and linear layers too (kernel choice "handwritten" leaves the layers
// on the process-wide backend instead of the autotuner's pick); all restored on scope exit.
class BackendGuard {
 public:
  explicit BackendGuard(const GemmConfig& c)
      : saved_(kernels::cuda::gemm_backend()), saved_planning_(kernels::cuda::gemm_planning()) {
    kernels::cuda::set_gemm_backend(c.backend);
    kernels::cuda::set_gemm_planning(c.planning);
  }
  ~BackendGuard() {
    kernels::cuda::set_gemm_backend(saved_);
    kernels::cuda::set_gemm_planning(saved_planning_);
  }

 private:
  ChoiceGuard choice_{kernels::cuda::KernelChoice::kHandwritten};
  GemmBackend saved_;
  GemmPlanning saved_planning_;
};
const GemmConfig kBackends[] = {{GemmBackend::kHandwritten, GemmPlanning::kAuto},
                                {GemmBackend::kHandwritten, GemmPlanning::kBaseline},
                                {GemmBackend::kHandwritten, GemmPlanning::kLarge},
                                {GemmBackend::kCublas, GemmPlanning::kAuto}};

// Tolerances. Conv/linear/GEMM: 1e-4 of max|ref| — float sums of a few hundred to a few thousand
// products in a different order (tiles, FMA) than the CPU's, with TF32 off. Element-wise ops are
// written without FMA contraction; 1e-6 of max|ref| allows the 1-ulp differences of the CPU's FMA clones.
constexpr double kGemmRel = 1e-4;
constexpr double kElementRel = 1e-6;
constexpr double kReductionRel = 1e-5;  // double-accumulated reductions (BN, pooling, softmax)

// --- GEMM -------------------------------------------------------------------------------------------

// Row-major reference in double: C = alpha*op(A)op(B) + beta*C.
std::vector<double> gemm_reference(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha,
                                   const std::vector<float>& a, int64_t lda, const std::vector<float>& b, int64_t ldb,
                                   double beta, const std::vector<float>& c, int64_t ldc) {
  std::vector<double> out(c.begin(), c.end());
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) s += static_cast<double>(ta ? a[p * lda + i] : a[i * lda + p]) *
                                           (tb ? b[j * ldb + p] : b[p * ldb + j]);
      const double prev = beta == 0 ? 0.0 : beta * c[i * ldc + j];
      out[i * ldc + j] = alpha * s + prev;
    }
  return out;
}

void check_gemm(const GemmConfig& backend, bool ta, bool tb, int64_t m, int64_t n, int64_t k, bool integers, uint64_t salt) {
  SCOPED_TRACE(::testing::Message() << backend.name() << " ta=" << ta << " tb=" << tb
                                    << " m=" << m << " n=" << n << " k=" << k << (integers ? " integers" : ""));
  BackendGuard guard(backend);
  Stream st;
  Rng rng(salt);
  const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 1, ldc = n + 2;  // padded leading dims
  const int64_t a_rows = ta ? k : m, b_rows = tb ? n : k;
  auto gen = [&](int64_t count) { return integers ? rng.small_int_vec(count) : rng.uniform_vec(count); };
  const std::vector<float> a = gen(a_rows * lda), b = gen(b_rows * ldb), c = gen(m * ldc);
  const float alpha = integers ? 1.0f : 0.75f;
  for (float beta : {0.0f, integers ? 1.0f : -1.5f}) {
    DevF da(a, {a_rows * lda, 1, 1, 1}, st), db(b, {b_rows * ldb, 1, 1, 1}, st), dc(c, {m * ldc, 1, 1, 1}, st);
    kernels::cuda::gemm(ta, tb, m, n, k, alpha, da.cview().data, lda, db.cview().data, ldb, beta, dc.view().data, ldc,
                        st);
    const std::vector<float> got = dc.download(st);
    const std::vector<double> ref = gemm_reference(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    if (integers) {
      EXPECT_TRUE(all_equal(got, ref)) << "beta=" << beta;
    } else {
      double mx = 0;
      for (double r : ref) mx = std::max(mx, std::fabs(r));
      EXPECT_TRUE(all_close(got, ref, kGemmRel * mx, kGemmRel)) << "beta=" << beta;
    }
  }
}

TEST(OpsCuda, GemmMatchesReferenceEveryTransposeAndBackend) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  // The last three have few output tiles and a long K: the hand-written kernel splits K (gemm.cu), in
  // chunks of whole 16-deep slices but a ragged last one.
  const int64_t shapes[][3] = {{1, 1, 1},   {3, 17, 33},  {33, 3, 17},     {65, 129, 257},
                               {17, 1, 64}, {1, 257, 3},  {10, 128, 3136}, {7, 33, 1001}, {64, 70, 490}};
  uint64_t salt = 0;
  for (const GemmConfig& be : kBackends)
    for (int t = 0; t < 4; ++t)
      for (const auto& sh : shapes) check_gemm(be, t & 1, t & 2, sh[0], sh[1], sh[2], false, ++salt);
}

TEST(OpsCuda, GemmSmallIntegersExact) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 100;
  for (const GemmConfig& be : kBackends)
    for (int t = 0; t < 4; ++t) {
      check_gemm(be, t & 1, t & 2, 70, 67, 300, true, ++salt);  // crosses tile edges in every dimension
      check_gemm(be, t & 1, t & 2, 1, 3, 17, true, ++salt);
      check_gemm(be, t & 1, t & 2, 5, 19, 2000, true, ++salt);  // K split in chunks, exact all the same
    }
}

TEST(OpsCuda, GemmZeroKScalesC) {
  PIPAR_REQUIRE_CUDA();
  for (const GemmConfig& be : kBackends) check_gemm(be, false, false, 5, 7, 0, true, 7);
}

// --- convolution ------------------------------------------------------------------------------------

struct ConvCase {
  Shape4 x, w;
  Conv2dParams p;
  bool bias;
};

std::string describe(const ConvCase& c) {
  return "x " + c.x.str() + " w " + c.w.str() + " k" + std::to_string(c.p.kh) + "x" + std::to_string(c.p.kw) +
         " s" + std::to_string(c.p.sh) + "x" + std::to_string(c.p.sw) + " p" + std::to_string(c.p.ph) + "x" +
         std::to_string(c.p.pw) + " g" + std::to_string(c.p.groups) + (c.bias ? " bias" : "");
}

std::vector<ConvCase> conv_cases() {
  auto params = [](int kh, int kw, int sh, int sw, int ph, int pw, int groups) {
    Conv2dParams p;
    p.kh = kh, p.kw = kw, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw, p.groups = groups;
    return p;
  };
  return {
      {{1, 3, 17, 17}, {5, 3, 3, 3}, params(3, 3, 1, 1, 1, 1, 1), true},
      {{2, 4, 33, 17}, {6, 2, 3, 3}, params(3, 3, 2, 2, 1, 1, 2), true},      // grouped, strided
      {{3, 1, 7, 9}, {1, 1, 1, 1}, params(1, 1, 1, 1, 0, 0, 1), false},       // pointwise, 1 channel
      {{2, 8, 9, 9}, {17, 8, 1, 1}, params(1, 1, 1, 1, 0, 0, 1), true},       // pointwise
      {{2, 6, 17, 13}, {6, 1, 3, 3}, params(3, 3, 2, 2, 1, 1, 6), true},      // depthwise
      {{1, 3, 11, 11}, {6, 1, 5, 5}, params(5, 5, 1, 1, 2, 2, 3), false},     // depthwise, multiplier 2
      {{2, 3, 17, 17}, {4, 3, 2, 2}, params(2, 2, 3, 3, 0, 0, 1), true},      // stride > kernel
      {{1, 5, 9, 33}, {7, 5, 1, 3}, params(1, 3, 1, 2, 0, 1, 1), false},      // non-square
      {{3, 33, 17, 17}, {17, 33, 3, 3}, params(3, 3, 1, 1, 1, 1, 1), true},   // ckk = 297 crosses K tiles
      {{2, 3, 5, 5}, {4, 3, 5, 5}, params(5, 5, 1, 1, 0, 0, 1), true},        // 1x1 output
      {{3, 12, 9, 9}, {20, 3, 3, 3}, params(3, 3, 1, 1, 1, 1, 4), true},      // samples x groups in one batched GEMM
      {{2, 8, 5, 5}, {12, 2, 1, 1}, params(1, 1, 1, 1, 0, 0, 4), false},      // grouped pointwise
      {{5, 48, 7, 7}, {48, 3, 3, 3}, params(3, 3, 1, 1, 1, 1, 16), false},    // a stack of 16 replicas' convolutions
      // Small outputs, several samples: one GEMM with the samples as columns (gemm_kernels.cuh)
      {{7, 40, 4, 4}, {37, 40, 3, 3}, params(3, 3, 1, 1, 1, 1, 1), true},    // VGG16's 4x4 layers, ragged
      {{3, 6, 9, 9}, {5, 6, 3, 3}, params(3, 3, 2, 2, 1, 1, 1), true},       // strided to 5x5
      {{6, 8, 2, 2}, {12, 2, 1, 1}, params(1, 1, 1, 1, 0, 0, 4), true},      // grouped pointwise at 2x2
  };
}

void check_conv(const ConvCase& c, bool integers, uint64_t salt) {
  SCOPED_TRACE(describe(c) + (integers ? " integers" : ""));
  Stream st;
  Rng rng(salt);
  auto gen = [&](int64_t count) { return integers ? rng.small_int_vec(count) : rng.uniform_vec(count); };
  const Shape4 ys = kernels::conv2d_out_shape(c.x, c.w, c.p), bs{c.w.n, 1, 1, 1};
  const std::vector<float> x = gen(c.x.numel()), b = gen(c.w.n), dy = gen(ys.numel());
  std::vector<float> w = gen(c.w.numel());
  // A one-weight case draws a zero weight one time in a few: the output would be zero, not a test.
  if (std::all_of(w.begin(), w.end(), [](float v) { return v == 0.0f; })) w[0] = 1.0f;
  const std::vector<float> dw0 = gen(c.w.numel()), db0 = gen(c.w.n);

  std::vector<float> y(ys.numel()), dx(c.x.numel()), dw = dw0, db = db0;
  kernels::conv2d_forward(c.p, cview(x, c.x), cview(w, c.w), c.bias ? cview(b, bs) : ConstView{}, view(y, ys));
  kernels::conv2d_backward_input(c.p, cview(dy, ys), cview(w, c.w), view(dx, c.x));
  kernels::conv2d_backward_weight(c.p, cview(x, c.x), cview(dy, ys), view(dw, c.w));
  kernels::conv2d_backward_bias(cview(dy, ys), view(db, bs));
  EXPECT_GT(l2_norm(y), 0.0);

  DevF gx(x, c.x, st), gw(w, c.w, st), gb(b, bs, st), gdy(dy, ys, st);
  DevF gy(nans(ys.numel()), ys, st), gdx(nans(c.x.numel()), c.x, st), gdw(dw0, c.w, st), gdb(db0, bs, st);
  kernels::conv2d_forward(c.p, gx.cview(), gw.cview(), c.bias ? gb.cview() : ConstView{}, gy.view(), st);
  kernels::conv2d_backward_input(c.p, gdy.cview(), gw.cview(), gdx.view(), st);
  kernels::conv2d_backward_weight(c.p, gx.cview(), gdy.cview(), gdw.view(), st);
  kernels::conv2d_backward_bias(gdy.cview(), gdb.view(), st);
  if (integers) {
    EXPECT_TRUE(all_equal(gy.download(st), y)) << "forward";
    EXPECT_TRUE(all_equal(gdx.download(st), dx)) << "backward input";
    EXPECT_TRUE(all_equal(gdw.download(st), dw)) << "backward weight (accumulated)";
    EXPECT_TRUE(all_equal(gdb.download(st), db)) << "backward bias (accumulated)";
  } else {
    EXPECT_TRUE(close_to_cpu(gy.download(st), y, kGemmRel)) << "forward";
    EXPECT_TRUE(close_to_cpu(gdx.download(st), dx, kGemmRel)) << "backward input";
    EXPECT_TRUE(close_to_cpu(gdw.download(st), dw, kGemmRel)) << "backward weight (accumulated)";
    EXPECT_TRUE(close_to_cpu(gdb.download(st), db, kGemmRel)) << "backward bias (accumulated)";
  }
}

TEST(OpsCuda, Conv2dMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 1000;
  for (const GemmConfig& be : kBackends) {
    BackendGuard guard(be);
    SCOPED_TRACE(be.name());
    for (const ConvCase& c : conv_cases()) check_conv(c, false, ++salt);
  }
}

TEST(OpsCuda, Conv2dSmallIntegersExact) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 2000;
  for (const GemmConfig& be : kBackends) {
    BackendGuard guard(be);
    SCOPED_TRACE(be.name());
    for (const ConvCase& c : conv_cases()) check_conv(c, true, ++salt);
  }
}

// --- linear -----------------------------------------------------------------------------------------

// groups > 1: the grouped layer (grouped_linear_*, one batched GEMM), x [n, groups*in], out per group.
void check_linear(Shape4 xs, int64_t out, bool bias, bool integers, uint64_t salt, int groups = 1) {
  SCOPED_TRACE(::testing::Message() << "x " << xs.str() << " out " << out << (bias ? " bias" : "")
                                    << (integers ? " integers" : "") << " groups " << groups);
  Stream st;
  Rng rng(salt);
  auto gen = [&](int64_t count) { return integers ? rng.small_int_vec(count) : rng.uniform_vec(count); };
  const int64_t g = groups;
  const Shape4 ws{g * out, xs.per_sample() / g, 1, 1}, ys{xs.n, g * out, 1, 1}, bs{g * out, 1, 1, 1};
  const std::vector<float> x = gen(xs.numel()), w = gen(ws.numel()), b = gen(g * out), dy = gen(ys.numel());
  const std::vector<float> dw0 = gen(ws.numel()), db0 = gen(g * out);

  std::vector<float> y(ys.numel()), dx(xs.numel()), dw = dw0, db = db0;
  kernels::grouped_linear_forward(groups, cview(x, xs), cview(w, ws), bias ? cview(b, bs) : ConstView{}, view(y, ys));
  kernels::grouped_linear_backward_input(groups, cview(dy, ys), cview(w, ws), view(dx, xs));
  kernels::grouped_linear_backward_weight(groups, cview(x, xs), cview(dy, ys), view(dw, ws));
  kernels::linear_backward_bias(cview(dy, ys), view(db, bs));

  DevF gx(x, xs, st), gw(w, ws, st), gb(b, bs, st), gdy(dy, ys, st);
  DevF gy(nans(ys.numel()), ys, st), gdx(nans(xs.numel()), xs, st), gdw(dw0, ws, st), gdb(db0, bs, st);
  kernels::grouped_linear_forward(groups, gx.cview(), gw.cview(), bias ? gb.cview() : ConstView{}, gy.view(), st);
  kernels::grouped_linear_backward_input(groups, gdy.cview(), gw.cview(), gdx.view(), st);
  kernels::grouped_linear_backward_weight(groups, gx.cview(), gdy.cview(), gdw.view(), st);
  kernels::linear_backward_bias(gdy.cview(), gdb.view(), st);
  if (integers) {
    EXPECT_TRUE(all_equal(gy.download(st), y)) << "forward";
    EXPECT_TRUE(all_equal(gdx.download(st), dx)) << "backward input";
    EXPECT_TRUE(all_equal(gdw.download(st), dw)) << "backward weight";
    EXPECT_TRUE(all_equal(gdb.download(st), db)) << "backward bias";
  } else {
    EXPECT_TRUE(close_to_cpu(gy.download(st), y, kGemmRel)) << "forward";
    EXPECT_TRUE(close_to_cpu(gdx.download(st), dx, kGemmRel)) << "backward input";
    EXPECT_TRUE(close_to_cpu(gdw.download(st), dw, kGemmRel)) << "backward weight";
    EXPECT_TRUE(close_to_cpu(gdb.download(st), db, kGemmRel)) << "backward bias";
  }
}

TEST(OpsCuda, LinearMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  uint64_t salt = 3000;
  for (const GemmConfig& be : kBackends) {
    BackendGuard guard(be);
    SCOPED_TRACE(be.name());
    for (bool integers : {false, true}) {
      check_linear({1, 1, 1, 1}, 1, true, integers, ++salt);
      check_linear({3, 17, 1, 1}, 33, true, integers, ++salt);
      check_linear({17, 257, 1, 1}, 3, false, integers, ++salt);
      check_linear({33, 65, 1, 1}, 129, true, integers, ++salt);
      check_linear({2, 3, 5, 5}, 10, true, integers, ++salt);  // flattened 4-d input
      check_linear({7, 3 * 33, 1, 1}, 17, true, integers, ++salt, 3);  // grouped: replicas stacked
      check_linear({10, 16 * 64, 1, 1}, 10, false, integers, ++salt, 16);
    }
  }
}

// cuDNN (vendor) and the autotuner's per-shape pick (auto) against the CPU: the same cases and
// tolerances as the hand-written kernels above; trial runs of an accumulating pass must not add into
// the gradient (the accumulated dw and db checks see that). Then the choices are in the cache file.
TEST(OpsCuda, VendorAndAutoKernelsMatchCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  const std::string cache = ::testing::TempDir() + "pipar_kernels_" + std::to_string(getpid()) + ".tsv";
  std::remove(cache.c_str());
  kernels::cuda::reset_tuner(cache);
  uint64_t salt = 5000;
  for (auto c : {kernels::cuda::KernelChoice::kVendor, kernels::cuda::KernelChoice::kAuto}) {
    ChoiceGuard guard(c);
    SCOPED_TRACE(kernels::cuda::kernel_choice_name(c));
    for (const ConvCase& cc : conv_cases()) check_conv(cc, false, ++salt);
    check_linear({3, 17, 1, 1}, 33, true, false, ++salt);
    check_linear({33, 65, 1, 1}, 129, true, false, ++salt);
    check_linear({10, 16 * 64, 1, 1}, 10, true, false, ++salt, 16);
  }
  const std::vector<std::string> chosen = kernels::cuda::cached_choices();
  EXPECT_FALSE(chosen.empty()) << "the autotuner recorded nothing in " << cache;
  bool conv_fwd = false, linear_bwd_w = false;
  for (const std::string& line : chosen) {
    conv_fwd |= line.find("|auto|conv.fwd|") != std::string::npos || line.rfind("auto|conv.fwd|", 0) == 0;
    linear_bwd_w |= line.find("linear.bwd_w|") != std::string::npos;
  }
  EXPECT_TRUE(conv_fwd) << "no conv forward choice cached";
  EXPECT_TRUE(linear_bwd_w) << "no linear backward-weight choice cached";
  // A new tuner over the same file reuses the choices (no timing) and still matches the CPU.
  kernels::cuda::reset_tuner(cache);
  {
    ChoiceGuard guard(kernels::cuda::KernelChoice::kAuto);
    for (const ConvCase& cc : conv_cases()) check_conv(cc, false, ++salt);
  }
  kernels::cuda::reset_tuner(kernels::KernelCache::default_path());
  std::remove(cache.c_str());
}

// --- activations, dropout, element-wise, optimizer ----------------------------------------------------

// Inputs spanning the kinks of every activation, with the exact kink values included.
std::vector<float> activation_inputs(Rng& rng, int64_t n) {
  std::vector<float> v = rng.uniform_vec(static_cast<size_t>(n), -5.0f, 5.0f);
  const float special[] = {-3.0f, 3.0f, 0.0f, -0.0f, 6.0f, -6.0f};
  for (size_t i = 0; i < std::size(special) && i < v.size(); ++i) v[i] = special[i];
  return v;
}

TEST(OpsCuda, ActivationsMatchCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(4000);
  for (Shape4 s : {Shape4{1, 1, 1, 1}, Shape4{3, 5, 17, 1}, Shape4{2, 33, 17, 3}}) {
    SCOPED_TRACE(s.str());
    const std::vector<float> x = activation_inputs(rng, s.numel()), dy = rng.uniform_vec(s.numel());
    using Fwd = void (*)(ConstView, View, StreamRef);
    using Bwd = void (*)(ConstView, ConstView, View, StreamRef);
    const struct {
      const char* name;
      Fwd fwd;
      Bwd bwd;
      bool bwd_uses_output;
    } ops[] = {{"relu", kernels::relu_forward, kernels::relu_backward, true},
               {"hardswish", kernels::hardswish_forward, kernels::hardswish_backward, false},
               {"hardsigmoid", kernels::hardsigmoid_forward, kernels::hardsigmoid_backward, false}};
    for (const auto& op : ops) {
      SCOPED_TRACE(op.name);
      std::vector<float> y(s.numel()), dx(s.numel());
      op.fwd(cview(x, s), view(y, s), {});
      op.bwd(op.bwd_uses_output ? cview(y, s) : cview(x, s), cview(dy, s), view(dx, s), {});
      DevF gx(x, s, st), gdy(dy, s, st), gy(nans(s.numel()), s, st), gdx(nans(s.numel()), s, st);
      op.fwd(gx.cview(), gy.view(), st);
      op.bwd(op.bwd_uses_output ? gy.cview() : gx.cview(), gdy.cview(), gdx.view(), st);
      EXPECT_TRUE(close_to_cpu(gy.download(st), y, kElementRel)) << "forward";
      EXPECT_TRUE(close_to_cpu(gdx.download(st), dx, kElementRel)) << "backward";
      // In place (x and y alias).
      DevF gxy(x, s, st);
      op.fwd(gxy.cview(), gxy.view(), st);
      EXPECT_TRUE(close_to_cpu(gxy.download(st), y, kElementRel)) << "in place";
    }
  }
}

TEST(OpsCuda, DropoutMatchesCpuBitForBit) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(5000);
  for (int64_t n : {int64_t{1}, int64_t{17}, int64_t{100003}})
    for (float p : {0.0f, 0.3f, 0.9f}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " p=" << p);
      const Shape4 s{n, 1, 1, 1};
      const uint64_t seed = static_cast<uint64_t>(rng.integer(0, 1 << 30)) * 7919u + 13u;
      const std::vector<float> x = rng.uniform_vec(n), dy = rng.uniform_vec(n);
      std::vector<float> y(n), mask(n), dx(n);
      kernels::dropout_forward(p, seed, cview(x, s), view(y, s), view(mask, s));
      kernels::dropout_backward(cview(mask, s), cview(dy, s), view(dx, s));
      DevF gx(x, s, st), gdy(dy, s, st), gy(nans(n), s, st), gm(nans(n), s, st), gdx(nans(n), s, st);
      kernels::dropout_forward(p, seed, gx.cview(), gy.view(), gm.view(), st);
      kernels::dropout_backward(gm.cview(), gdy.cview(), gdx.view(), st);
      EXPECT_TRUE(same_as_cpu(gm.download(st), mask)) << "mask";
      EXPECT_TRUE(same_as_cpu(gy.download(st), y)) << "y";
      EXPECT_TRUE(same_as_cpu(gdx.download(st), dx)) << "dx";
    }
}

TEST(OpsCuda, ElementwiseMatchCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(6000);
  for (Shape4 s : {Shape4{1, 1, 1, 1}, Shape4{3, 17, 5, 7}, Shape4{2, 33, 1, 1}}) {
    SCOPED_TRACE(s.str());
    const int64_t n = s.numel();
    const Shape4 cs{s.n, s.c, 1, 1};
    const std::vector<float> a = rng.uniform_vec(n), b = rng.uniform_vec(n), sc = rng.uniform_vec(cs.numel());
    // add
    std::vector<float> y(n);
    kernels::add_forward(cview(a, s), cview(b, s), view(y, s));
    DevF ga(a, s, st), gb(b, s, st), gy(nans(n), s, st);
    kernels::add_forward(ga.cview(), gb.cview(), gy.view(), st);
    EXPECT_TRUE(close_to_cpu(gy.download(st), y, kElementRel)) << "add";
    // channel_mul forward and backward (a = x, b = dy)
    std::vector<float> cy(n), cdx(n), cds(cs.numel());
    kernels::channel_mul_forward(cview(a, s), cview(sc, cs), view(cy, s));
    kernels::channel_mul_backward(cview(a, s), cview(sc, cs), cview(b, s), view(cdx, s), view(cds, cs));
    DevF gsc(sc, cs, st), gcy(nans(n), s, st), gcdx(nans(n), s, st), gcds(nans(cs.numel()), cs, st);
    kernels::channel_mul_forward(ga.cview(), gsc.cview(), gcy.view(), st);
    kernels::channel_mul_backward(ga.cview(), gsc.cview(), gb.cview(), gcdx.view(), gcds.view(), st);
    EXPECT_TRUE(close_to_cpu(gcy.download(st), cy, kElementRel)) << "channel_mul_forward";
    EXPECT_TRUE(close_to_cpu(gcdx.download(st), cdx, kElementRel)) << "channel_mul_backward dx";
    EXPECT_TRUE(close_to_cpu(gcds.download(st), cds, kReductionRel)) << "channel_mul_backward dscale";
    // axpy, scale, fill, copy (in sequence on one buffer)
    std::vector<float> z = b;
    kernels::axpy(0.37f, cview(a, s), view(z, s));
    kernels::scale(-1.75f, view(z, s));
    std::vector<float> f(n), c(n);
    kernels::fill(2.5f, view(f, s));
    kernels::copy(cview(z, s), view(c, {n, 1, 1, 1}));
    DevF gz(b, s, st), gf(nans(n), s, st), gc(nans(n), {n, 1, 1, 1}, st);
    kernels::axpy(0.37f, ga.cview(), gz.view(), st);
    kernels::scale(-1.75f, gz.view(), st);
    kernels::fill(2.5f, gf.view(), st);
    kernels::copy(gz.cview(), gc.view(), st);
    EXPECT_TRUE(close_to_cpu(gz.download(st), z, kElementRel)) << "axpy + scale";
    EXPECT_TRUE(same_as_cpu(gf.download(st), f)) << "fill";
    EXPECT_TRUE(close_to_cpu(gc.download(st), c, kElementRel)) << "copy";
  }
}

TEST(OpsCuda, SgdMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(7000);
  kernels::SgdParams p;
  p.lr = 0.05f, p.momentum = 0.9f, p.weight_decay = 1e-3f;
  for (int64_t n : {int64_t{1}, int64_t{33}, int64_t{65537}}) {
    const Shape4 s{n, 1, 1, 1};
    std::vector<float> param = rng.uniform_vec(n), grad = rng.uniform_vec(n), buf = rng.uniform_vec(n);
    DevF gp(param, s, st), gg(grad, s, st), gbuf(buf, s, st);
    for (int step = 0; step < 3; ++step) {
      kernels::sgd_step(p, view(param, s), cview(grad, s), view(buf, s));
      kernels::sgd_step(p, gp.view(), gg.cview(), gbuf.view(), st);
    }
    EXPECT_TRUE(close_to_cpu(gp.download(st), param, kElementRel)) << "param, n=" << n;
    EXPECT_TRUE(close_to_cpu(gbuf.download(st), buf, kElementRel)) << "momentum buffer, n=" << n;
  }
}

// --- pooling ----------------------------------------------------------------------------------------

TEST(OpsCuda, PoolingMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(8000);
  auto params = [](int kh, int kw, int sh, int sw, int ph, int pw) {
    Pool2dParams p;
    p.kh = kh, p.kw = kw, p.sh = sh, p.sw = sw, p.ph = ph, p.pw = pw;
    return p;
  };
  const struct {
    Shape4 x;
    Pool2dParams p;
  } cases[] = {{{2, 3, 17, 17}, params(3, 3, 2, 2, 1, 1)}, {{1, 2, 33, 7}, params(2, 2, 2, 2, 0, 0)},
               {{3, 1, 9, 9}, params(3, 3, 1, 1, 1, 1)},   {{1, 3, 5, 5}, params(2, 2, 3, 3, 0, 0)},
               {{2, 2, 8, 13}, params(2, 3, 1, 2, 1, 1)},  {{1, 1, 1, 1}, params(1, 1, 1, 1, 0, 0)}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.x.str());
    const Shape4 ys = kernels::pool2d_out_shape(c.x, c.p), gs{c.x.n, c.x.c, 1, 1};
    const std::vector<float> x = rng.uniform_vec(c.x.numel()), dy = rng.uniform_vec(ys.numel());
    const std::vector<float> gdy_h = rng.uniform_vec(gs.numel());
    std::vector<float> my(ys.numel()), mdx(c.x.numel()), ay(ys.numel()), adx(c.x.numel()), gy(gs.numel()),
        gdx(c.x.numel());
    std::vector<int32_t> am(ys.numel());
    kernels::max_pool2d_forward(c.p, cview(x, c.x), view(my, ys), iview(am, ys));
    kernels::max_pool2d_backward(c.p, cview(dy, ys), ciview(am, ys), view(mdx, c.x));
    kernels::avg_pool2d_forward(c.p, cview(x, c.x), view(ay, ys));
    kernels::avg_pool2d_backward(c.p, cview(dy, ys), view(adx, c.x));
    kernels::global_avg_pool_forward(cview(x, c.x), view(gy, gs));
    kernels::global_avg_pool_backward(cview(gdy_h, gs), view(gdx, c.x));

    DevF dx_in(x, c.x, st), ddy(dy, ys, st), dgdy(gdy_h, gs, st);
    DevF dmy(nans(ys.numel()), ys, st), dmdx(nans(c.x.numel()), c.x, st), day(nans(ys.numel()), ys, st);
    DevF dadx(nans(c.x.numel()), c.x, st), dgy(nans(gs.numel()), gs, st), dgdx(nans(c.x.numel()), c.x, st);
    DevI dam(std::vector<int32_t>(ys.numel(), -1), ys, st);
    kernels::max_pool2d_forward(c.p, dx_in.cview(), dmy.view(), dam.view(), st);
    kernels::max_pool2d_backward(c.p, ddy.cview(), dam.cview(), dmdx.view(), st);
    kernels::avg_pool2d_forward(c.p, dx_in.cview(), day.view(), st);
    kernels::avg_pool2d_backward(c.p, ddy.cview(), dadx.view(), st);
    kernels::global_avg_pool_forward(dx_in.cview(), dgy.view(), st);
    kernels::global_avg_pool_backward(dgdy.cview(), dgdx.view(), st);
    EXPECT_TRUE(same_as_cpu(dmy.download(st), my)) << "max forward";
    EXPECT_TRUE(all_equal(dam.download(st), am)) << "argmax";
    EXPECT_TRUE(close_to_cpu(dmdx.download(st), mdx, kElementRel)) << "max backward";
    EXPECT_TRUE(close_to_cpu(day.download(st), ay, kElementRel)) << "avg forward";
    EXPECT_TRUE(close_to_cpu(dadx.download(st), adx, kElementRel)) << "avg backward";
    EXPECT_TRUE(close_to_cpu(dgy.download(st), gy, kReductionRel)) << "global avg forward";
    EXPECT_TRUE(close_to_cpu(dgdx.download(st), gdx, kElementRel)) << "global avg backward";
  }
}

// --- batch norm -------------------------------------------------------------------------------------

TEST(OpsCuda, BatchNormMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(9000);
  kernels::BatchNormParams p;
  for (Shape4 s : {Shape4{2, 3, 1, 1}, Shape4{3, 5, 17, 3}, Shape4{1, 4, 1, 7}, Shape4{4, 33, 5, 5}}) {
    SCOPED_TRACE(s.str());
    const Shape4 cs{s.c, 1, 1, 1};
    const int64_t n = s.numel(), c = s.c;
    std::vector<float> x = rng.uniform_vec(n, -2.0f, 4.0f);  // a mean far from zero
    const std::vector<float> gamma = rng.uniform_vec(c, 0.5f, 1.5f), beta = rng.uniform_vec(c), dy = rng.uniform_vec(n);
    const std::vector<float> rm0 = rng.uniform_vec(c), rv0 = rng.uniform_vec(c, 0.5f, 2.0f);
    const std::vector<float> dg0 = rng.uniform_vec(c), db0 = rng.uniform_vec(c);
    std::vector<float> rm = rm0, rv = rv0, sm(c), si(c), y(n), yi(n), dx(n), dg = dg0, db = db0;
    kernels::batch_norm_forward_train(p, cview(x, s), cview(gamma, cs), cview(beta, cs), view(rm, cs), view(rv, cs),
                                      view(sm, cs), view(si, cs), view(y, s));
    kernels::batch_norm_forward_inference(p, cview(x, s), cview(gamma, cs), cview(beta, cs), cview(rm, cs),
                                          cview(rv, cs), view(yi, s));
    kernels::batch_norm_backward(cview(x, s), cview(dy, s), cview(gamma, cs), cview(sm, cs), cview(si, cs),
                                 view(dx, s), view(dg, cs), view(db, cs));

    DevF gx(x, s, st), gg(gamma, cs, st), gbeta(beta, cs, st), gdy(dy, s, st), grm(rm0, cs, st), grv(rv0, cs, st);
    DevF gsm(nans(c), cs, st), gsi(nans(c), cs, st), gy(nans(n), s, st), gyi(nans(n), s, st), gdx(nans(n), s, st);
    DevF gdg(dg0, cs, st), gdb(db0, cs, st);
    kernels::batch_norm_forward_train(p, gx.cview(), gg.cview(), gbeta.cview(), grm.view(), grv.view(), gsm.view(),
                                      gsi.view(), gy.view(), st);
    kernels::batch_norm_forward_inference(p, gx.cview(), gg.cview(), gbeta.cview(), grm.cview(), grv.cview(),
                                          gyi.view(), st);
    kernels::batch_norm_backward(gx.cview(), gdy.cview(), gg.cview(), gsm.cview(), gsi.cview(), gdx.view(), gdg.view(),
                                 gdb.view(), st);
    EXPECT_TRUE(close_to_cpu(gy.download(st), y, kReductionRel)) << "train y";
    EXPECT_TRUE(close_to_cpu(grm.download(st), rm, kReductionRel)) << "running mean";
    EXPECT_TRUE(close_to_cpu(grv.download(st), rv, kReductionRel)) << "running var";
    EXPECT_TRUE(close_to_cpu(gsm.download(st), sm, kReductionRel)) << "saved mean";
    EXPECT_TRUE(close_to_cpu(gsi.download(st), si, kReductionRel)) << "saved invstd";
    EXPECT_TRUE(close_to_cpu(gyi.download(st), yi, kReductionRel)) << "inference y";
    // dx = k*dy + a*(x-mean) + b cancels: relative to max|dx| with a looser bound.
    EXPECT_TRUE(close_to_cpu(gdx.download(st), dx, 1e-4)) << "dx";
    EXPECT_TRUE(close_to_cpu(gdg.download(st), dg, kReductionRel)) << "dgamma (accumulated)";
    EXPECT_TRUE(close_to_cpu(gdb.download(st), db, kReductionRel)) << "dbeta (accumulated)";
  }
}

// --- softmax cross-entropy ----------------------------------------------------------------------------

TEST(OpsCuda, SoftmaxCrossEntropyMatchesCpu) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Stream st;
  Rng rng(10000);
  for (int64_t n : {int64_t{1}, int64_t{3}, int64_t{17}})
    for (int64_t k : {int64_t{1}, int64_t{10}, int64_t{1000}}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " k=" << k);
      const Shape4 ls{n, k, 1, 1}, ns{n, 1, 1, 1};
      const std::vector<float> logits = rng.uniform_vec(n * k, -8.0f, 8.0f);
      std::vector<int32_t> labels(n);
      for (auto& l : labels) l = rng.integer(0, static_cast<int>(k) - 1);
      const float scale = 1.0f / static_cast<float>(n);
      std::vector<float> probs(n * k), losses(n), dl(n * k);
      kernels::softmax_cross_entropy_forward(cview(logits, ls), ciview(labels, ns), view(probs, ls), view(losses, ns));
      kernels::softmax_cross_entropy_backward(cview(probs, ls), ciview(labels, ns), scale, view(dl, ls));
      DevF gl(logits, ls, st), gp(nans(n * k), ls, st), gloss(nans(n), ns, st), gdl(nans(n * k), ls, st);
      DevI glab(labels, ns, st);
      kernels::softmax_cross_entropy_forward(gl.cview(), glab.cview(), gp.view(), gloss.view(), st);
      kernels::softmax_cross_entropy_backward(gp.cview(), glab.cview(), scale, gdl.view(), st);
      // expf on the GPU is within 2 ulp of glibc's; sums in double: probabilities agree to ~1e-6.
      const std::vector<float> got_p = gp.download(st);
      EXPECT_TRUE(all_close(got_p, to_double(probs), 1e-7, 1e-5)) << "probs";
      EXPECT_TRUE(all_close(gloss.download(st), to_double(losses), 1e-5, 1e-5)) << "losses";
      EXPECT_TRUE(all_close(gdl.download(st), to_double(dl), 1e-7, 1e-5)) << "dlogits";
    }
}

// An out-of-range label cannot throw from a kernel: it must stay in bounds and show up as a NaN loss.
TEST(OpsCuda, SoftmaxCrossEntropyInvalidLabelStaysInBounds) {
  PIPAR_REQUIRE_CUDA();
  Stream st;
  Rng rng(11000);
  const int64_t n = 3, k = 5;
  const Shape4 ls{n, k, 1, 1}, ns{n, 1, 1, 1};
  const std::vector<float> logits = rng.uniform_vec(n * k);
  DevF gl(logits, ls, st), gp(nans(n * k), ls, st), gloss(nans(n), ns, st), gdl(nans(n * k), ls, st);
  DevI glab(std::vector<int32_t>{1, static_cast<int32_t>(k), -1}, ns, st);
  kernels::softmax_cross_entropy_forward(gl.cview(), glab.cview(), gp.view(), gloss.view(), st);
  kernels::softmax_cross_entropy_backward(gp.cview(), glab.cview(), 1.0f, gdl.view(), st);
  const std::vector<float> loss = gloss.download(st), probs = gp.download(st), dl = gdl.download(st);
  EXPECT_TRUE(std::isfinite(loss[0]));
  EXPECT_TRUE(std::isnan(loss[1]));
  EXPECT_TRUE(std::isnan(loss[2]));
  for (int64_t j = 0; j < k; ++j) {
    EXPECT_EQ(dl[k + j], probs[k + j]);  // no -1 anywhere in an invalid row
    EXPECT_EQ(dl[2 * k + j], probs[2 * k + j]);
  }
}

// --- streams ----------------------------------------------------------------------------------------

TEST(OpsCuda, NullStreamIsRefused) {
  PIPAR_REQUIRE_CUDA();
  Stream st;
  DevF buf(std::vector<float>(8, 1.0f), {8, 1, 1, 1}, st);
  EXPECT_THROW(kernels::fill(0.0f, buf.view()), Error);
  EXPECT_THROW(kernels::cuda::gemm(false, false, 1, 1, 1, 1.0f, buf.cview().data, 1, buf.cview().data, 1, 0.0f,
                                   buf.view().data, 1, StreamRef{}),
               Error);
}

TEST(OpsCuda, StreamAndEventBasics) {
  PIPAR_REQUIRE_CUDA();
  Stream a, b;
  kernels::cuda::Event start(kernels::cuda::Event::Kind::kTiming), stop(kernels::cuda::Event::Kind::kTiming);
  kernels::cuda::Event ready;
  DevF buf(std::vector<float>(1 << 20, 0.0f), {1 << 20, 1, 1, 1}, a);
  start.record(a);
  kernels::fill(3.0f, buf.view(), a);
  ready.record(a);
  stop.record(a);
  b.wait(ready);  // b's scale runs after a's fill, without the host waiting
  kernels::scale(2.0f, buf.view(), b);
  stop.synchronize();
  EXPECT_TRUE(stop.query());
  EXPECT_GE(kernels::cuda::Event::elapsed_ms(start, stop), 0.0f);
  const std::vector<float> got = buf.download(b);
  EXPECT_EQ(got.front(), 6.0f);
  EXPECT_EQ(got.back(), 6.0f);
  Stream moved = std::move(a);  // move-only ownership
  EXPECT_EQ(a.native(), nullptr);
  EXPECT_NE(moved.native(), nullptr);
}

// One training step's op sequence on its own buffers: conv (+bias) → relu → max-pool → linear →
// softmax cross-entropy → backward through linear → SGD on the linear weight.
class StepBuffers {
 public:
  static constexpr Shape4 kX{3, 3, 17, 17}, kW{8, 3, 3, 3}, kB{8, 1, 1, 1};
  StepBuffers(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& lw,
              const std::vector<int32_t>& labels, const Stream& st)
      : x_(x, kX, st), w_(w, kW, st), b_(std::vector<float>(8, 0.1f), kB, st),
        y_(nans(conv_shape().numel()), conv_shape(), st), py_(nans(pool_shape().numel()), pool_shape(), st),
        am_(std::vector<int32_t>(pool_shape().numel(), 0), pool_shape(), st), lw_(lw, lw_shape(), st),
        logits_(nans(3 * 10), {3, 10, 1, 1}, st), probs_(nans(3 * 10), {3, 10, 1, 1}, st),
        losses_(nans(3), {3, 1, 1, 1}, st), dlogits_(nans(3 * 10), {3, 10, 1, 1}, st),
        dlw_(std::vector<float>(lw.size(), 0.0f), lw_shape(), st), dpy_(nans(pool_shape().numel()), pool_shape(), st),
        mom_(std::vector<float>(lw.size(), 0.0f), lw_shape(), st), labels_(labels, {3, 1, 1, 1}, st) {}

  void run(StreamRef s) {
    Conv2dParams cp;
    cp.ph = cp.pw = 1;
    kernels::conv2d_forward(cp, x_.cview(), w_.cview(), b_.cview(), y_.view(), s);
    kernels::relu_forward(y_.cview(), y_.view(), s);
    kernels::max_pool2d_forward(Pool2dParams{}, y_.cview(), py_.view(), am_.view(), s);
    kernels::linear_forward(py_.cview(), lw_.cview(), {}, logits_.view(), s);
    kernels::softmax_cross_entropy_forward(logits_.cview(), labels_.cview(), probs_.view(), losses_.view(), s);
    kernels::softmax_cross_entropy_backward(probs_.cview(), labels_.cview(), 1.0f / 3, dlogits_.view(), s);
    kernels::linear_backward_weight(py_.cview(), dlogits_.cview(), dlw_.view(), s);
    kernels::linear_backward_input(dlogits_.cview(), lw_.cview(), dpy_.view(), s);
    kernels::sgd_step(kernels::SgdParams{}, lw_.view(), dlw_.cview(), mom_.view(), s);
  }
  std::vector<std::vector<float>> results(const Stream& st) const {
    return {y_.download(st), py_.download(st), losses_.download(st), dpy_.download(st), lw_.download(st)};
  }

 private:
  static Shape4 conv_shape() { return {3, 8, 17, 17}; }
  static Shape4 pool_shape() { return {3, 8, 8, 8}; }
  static Shape4 lw_shape() { return {10, 8 * 8 * 8, 1, 1}; }
  DevF x_, w_, b_, y_, py_;
  DevI am_;
  DevF lw_, logits_, probs_, losses_, dlogits_, dlw_, dpy_, mom_;
  DevI labels_;
};

// Two streams running the same op sequence on independent buffers (workspaces and cuBLAS handles are
// per stream) give exactly what one stream gives running them one after the other.
TEST(OpsCuda, TwoStreamsMatchOneStream) {
  PIPAR_REQUIRE_CUDA();
  SCOPED_TRACE(seed_trace());
  Rng rng(12000);
  const std::vector<float> x = rng.uniform_vec(StepBuffers::kX.numel()), w = rng.uniform_vec(StepBuffers::kW.numel());
  const std::vector<float> lw = rng.uniform_vec(10 * 512, -0.05f, 0.05f);
  const std::vector<int32_t> labels{0, 7, 9};
  for (const GemmConfig& be : kBackends) {
    BackendGuard guard(be);
    SCOPED_TRACE(be.name());
    Stream s0, s1, s2;
    StepBuffers ref(x, w, lw, labels, s0), one(x, w, lw, labels, s1), two(x, w, lw, labels, s2);
    for (int it = 0; it < 3; ++it) {
      ref.run(s0);
      s0.synchronize();  // strictly one after the other
    }
    for (int it = 0; it < 3; ++it) {
      one.run(s1);  // interleaved, free to overlap on the GPU
      two.run(s2);
    }
    const auto r = ref.results(s0), a = one.results(s1), b = two.results(s2);
    for (size_t i = 0; i < r.size(); ++i) {
      EXPECT_GT(l2_norm(r[i]), 0.0) << "output " << i;
      // Our kernels are deterministic (no atomics); cuBLAS is run-to-run reproducible on one GPU.
      EXPECT_TRUE(same_as_cpu(a[i], r[i])) << "stream 1, output " << i;
      EXPECT_TRUE(same_as_cpu(b[i], r[i])) << "stream 2, output " << i;
    }
  }
}

}  // namespace
}  // namespace pipar::test
#endif  // PIPAR_HAS_CUDA
