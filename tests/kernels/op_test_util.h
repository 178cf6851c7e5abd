// Helpers shared by the CPU op tests: views over std::vector, float/double conversion, a tolerance
// comparison that reports the worst element, central finite differences in double, and a guard that
// runs a test body under each CPU thread count and restores the previous one.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/parallel.h"
#include "kernels/tensor_view.h"

namespace pipar::test {

inline View view(std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }
inline ConstView cview(const std::vector<float>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }
inline IndexView iview(std::vector<int32_t>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }
inline ConstIndexView ciview(const std::vector<int32_t>& v, Shape4 s) { return {v.data(), s, Device::kCpu}; }

inline std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }
inline std::vector<float> to_float(const std::vector<double>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = static_cast<float>(v[i]);
  return f;
}

inline double l2_norm(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

// Every |got - ref| <= atol + rtol*|ref|, NaN/Inf only where the reference has the same; reports the
// count of bad elements and the worst one.
inline ::testing::AssertionResult all_close(const std::vector<float>& got, const std::vector<double>& ref, double atol,
                                            double rtol) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs reference " << ref.size();
  size_t bad = 0, worst = 0;
  double worst_excess = -1;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], r = ref[i];
    bool ok;
    double excess = 0;
    if (!std::isfinite(r) || !std::isfinite(g)) {
      ok = (std::isnan(r) && std::isnan(g)) || g == r;
      excess = ok ? 0 : INFINITY;
    } else {
      excess = std::fabs(g - r) - (atol + rtol * std::fabs(r));
      ok = excess <= 0;
    }
    if (!ok) {
      ++bad;
      if (excess > worst_excess) worst_excess = excess, worst = i;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements off (atol " << atol << ", rtol "
                                       << rtol << "); worst at " << worst << ": got " << got[worst] << ", reference "
                                       << ref[worst];
}

// Exact comparison (integer-valued inputs), with the first mismatch reported.
template <class A, class B>
::testing::AssertionResult all_equal(const std::vector<A>& got, const std::vector<B>& ref) {
  if (got.size() != ref.size())
    return ::testing::AssertionFailure() << "size " << got.size() << " vs reference " << ref.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (!(static_cast<double>(got[i]) == static_cast<double>(ref[i])))
      return ::testing::AssertionFailure() << "element " << i << ": got " << got[i] << ", reference " << ref[i];
  return ::testing::AssertionSuccess();
}

// Central differences of a scalar function of x, all in double: (f(x+h e_i) - f(x-h e_i)) / 2h.
inline std::vector<double> numeric_grad(const std::function<double(const std::vector<double>&)>& f,
                                        std::vector<double> x, double h) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

inline double dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// Runs body(threads) once per CPU thread count (1 and 2), restoring the process-wide count after.
template <class F>
void for_each_thread_count(F&& body) {
  const int saved = kernels::num_threads();
  for (int t : {1, 2}) {
    kernels::set_num_threads(t);
    SCOPED_TRACE(::testing::Message() << "threads=" << t);
    body(t);
  }
  kernels::set_num_threads(saved);
}

}  // namespace pipar::test
