// Output shapes and validation shared by every backend.
#include <sstream>

#include "kernels/ops.h"

namespace pipar {

std::string Shape4::str() const {
  std::ostringstream os;
  os << "[" << n << ", " << c << ", " << h << ", " << w << "]";
  return os.str();
}

const char* device_name(Device d) { return d == Device::kCpu ? "cpu" : "cuda"; }

namespace kernels {

Shape4 conv2d_out_shape(Shape4 x, Shape4 w, const Conv2dParams& p) {
  auto fail = [&](const char* why) -> Shape4 {
    throw ShapeError(detail::concat("conv2d: ", why, " (x ", x.str(), ", w ", w.str(), ", kernel ", p.kh, "x",
                                    p.kw, ", stride ", p.sh, "x", p.sw, ", pad ", p.ph, "x", p.pw,
                                    ", groups ", p.groups, ")"));
  };
  if (p.kh < 1 || p.kw < 1 || p.sh < 1 || p.sw < 1 || p.ph < 0 || p.pw < 0 || p.groups < 1)
    return fail("kernel and stride must be >= 1, padding >= 0, groups >= 1");
  if (x.c % p.groups != 0 || w.n % p.groups != 0) return fail("channels not divisible by groups");
  if (w.c != x.c / p.groups) return fail("weight in-channels != x channels / groups");
  if (w.h != p.kh || w.w != p.kw) return fail("weight spatial size != kernel size");
  const int64_t oh = (x.h + 2 * p.ph - p.kh) / p.sh + 1;
  const int64_t ow = (x.w + 2 * p.pw - p.kw) / p.sw + 1;
  if (x.h + 2 * p.ph < p.kh || x.w + 2 * p.pw < p.kw || oh < 1 || ow < 1)
    return fail("kernel larger than the padded input");
  return {x.n, w.n, oh, ow};
}

Shape4 linear_out_shape(Shape4 x, Shape4 w, int groups) {
  if (groups < 1 || w.n % groups)
    throw ShapeError(detail::concat("linear: ", w.n, " outputs in w ", w.str(), " cannot form ", groups, " groups"));
  if (w.h != 1 || w.w != 1 || x.per_sample() != w.c * groups)
    throw ShapeError(detail::concat("linear: x ", x.str(), " has ", x.per_sample(),
                                    " features per sample but w ", w.str(), " expects [out, in=", w.c,
                                    ", 1, 1]", groups > 1 ? detail::concat(" in each of ", groups, " groups") : std::string()));
  return {x.n, w.n, 1, 1};
}

Shape4 pool2d_out_shape(Shape4 x, const Pool2dParams& p) {
  if (p.kh < 1 || p.kw < 1 || p.sh < 1 || p.sw < 1 || p.ph < 0 || p.pw < 0 || 2 * p.ph > p.kh ||
      2 * p.pw > p.kw || x.h + 2 * p.ph < p.kh || x.w + 2 * p.pw < p.kw)
    throw ShapeError(detail::concat("pool2d: x ", x.str(), " does not fit kernel ", p.kh, "x", p.kw,
                                    ", stride ", p.sh, "x", p.sw, ", pad ", p.ph, "x", p.pw,
                                    " (padding at most half the kernel)"));
  return {x.n, x.c, (x.h + 2 * p.ph - p.kh) / p.sh + 1, (x.w + 2 * p.pw - p.kw) / p.sw + 1};
}

int64_t conv2d_flops(Shape4 x, Shape4 w, const Conv2dParams& p) {
  const Shape4 y = conv2d_out_shape(x, w, p);
  return 2 * y.numel() * w.c * w.h * w.w;
}

}  // namespace kernels
}  // namespace pipar
