// CPU fully connected layer, y = x W^T + b, on the packed GEMM: x [n, in], W [out, in], y [n, out].
// Parameter gradients accumulate (+=), as everywhere in ops.h.
#include <omp.h>

#include <algorithm>

#include "kernels/cpu/gemm_internal.h"
#include "kernels/ops.h"
#include "kernels/parallel.h"

namespace pipar::kernels::cpu {

// Grouped (ops.h's grouped_linear_*): group g's features, outputs and weight rows are column and row
// slices at g*in, g*out and g*out*in, read in place through the GEMM's leading dimensions.
void linear_forward(int groups, ConstView x, ConstView w, ConstView b, View y) {
  const int64_t n = x.shape.n, in = w.shape.c, out = w.shape.n / groups, ld_x = in * groups, ld_y = out * groups;
  if (b.data)
    for (int64_t s = 0; s < n; ++s) std::copy(b.data, b.data + ld_y, y.data + s * ld_y);
  for (int64_t g = 0; g < groups; ++g)
    gemm(false, true, n, out, in, 1.0f, x.data + g * in, ld_x, w.data + g * out * in, in, b.data ? 1.0f : 0.0f,
         y.data + g * out, ld_y);
}

void linear_backward_input(int groups, ConstView dy, ConstView w, View dx) {
  const int64_t n = dy.shape.n, in = w.shape.c, out = w.shape.n / groups, ld_x = in * groups, ld_y = out * groups;
  for (int64_t g = 0; g < groups; ++g)
    gemm(false, false, n, in, out, 1.0f, dy.data + g * out, ld_y, w.data + g * out * in, in, 0.0f, dx.data + g * in,
         ld_x);
}

void linear_backward_weight(int groups, ConstView x, ConstView dy, View dw) {
  const int64_t n = x.shape.n, in = dw.shape.c, out = dw.shape.n / groups, ld_x = in * groups, ld_y = out * groups;
  for (int64_t g = 0; g < groups; ++g)
    gemm(true, false, out, in, n, 1.0f, dy.data + g * out, ld_y, x.data + g * in, ld_x, 1.0f, dw.data + g * out * in,
         in);
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
