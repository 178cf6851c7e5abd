// CPU fully connected layer, y = x W^T + b, on the packed GEMM: x [n, in], W [out, in], y [n, out].
// Parameter gradients accumulate (+=), as everywhere in ops.h.
#include <omp.h>

#include <algorithm>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {

void linear_forward(ConstView x, ConstView w, ConstView b, View y) {
  const int64_t n = x.shape.n, in = w.shape.c, out = w.shape.n;
  if (b.data)
    for (int64_t s = 0; s < n; ++s) std::copy(b.data, b.data + out, y.data + s * out);
  gemm(false, true, n, out, in, 1.0f, x.data, in, w.data, in, b.data ? 1.0f : 0.0f, y.data, out);
}

void linear_backward_input(ConstView dy, ConstView w, View dx) {
  const int64_t n = dy.shape.n, in = w.shape.c, out = w.shape.n;
  gemm(false, false, n, in, out, 1.0f, dy.data, out, w.data, in, 0.0f, dx.data, in);
}

void linear_backward_weight(ConstView x, ConstView dy, View dw) {
  const int64_t n = x.shape.n, in = dw.shape.c, out = dw.shape.n;
  gemm(true, false, out, in, n, 1.0f, dy.data, out, x.data, in, 1.0f, dw.data, in);
}

void linear_backward_bias(ConstView dy, View db) {
  const int64_t n = dy.shape.n, out = dy.shape.per_sample();
  // Column sums: rows stream through once; each thread owns a slice of columns.
  const int threads = n * out < 64 * 1024 ? 1 : num_threads();
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    const int64_t j0 = out * t / nt, j1 = out * (t + 1) / nt;
    for (int64_t s = 0; s < n; ++s) {
      const float* row = dy.data + s * out;
      for (int64_t j = j0; j < j1; ++j) db.data[j] += row[j];
    }
  }
}

}  // namespace pipar::kernels::cpu
