// Owning tensors over kernels/device.h memory.
#include "runtime/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/device.h"
#include "kernels/error.h"
#include "kernels/ops.h"

namespace pipar {

Tensor::Storage::~Storage() {
  if (pinned) kernels::pinned_free(ptr, true);
  else kernels::device_free(device, ptr, stream);
}

Tensor Tensor::allocate(Shape4 shape, Device device, DType dtype, bool pinned, const char* who) {
  if (shape.n < 0 || shape.c < 0 || shape.h < 0 || shape.w < 0)
    throw ShapeError(std::string(who) + ": negative dimension in " + shape.str());
  Tensor t;
  t.storage_ = std::make_shared<Storage>();
  t.storage_->bytes = static_cast<size_t>(shape.numel()) * 4;
  t.storage_->device = device;
  if (pinned) {
    t.storage_->ptr = kernels::pinned_alloc(t.storage_->bytes, &t.storage_->pinned);
  } else {
    if (device != Device::kCpu) t.storage_->stream = kernels::current_stream();
    t.storage_->ptr = kernels::device_alloc(device, t.storage_->bytes);
  }
  t.shape_ = shape;
  t.device_ = device;
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::empty(Shape4 shape, Device device, DType dtype) {
  return allocate(shape, device, dtype, false, "Tensor::empty");
}

Tensor Tensor::empty_host(Shape4 shape, DType dtype, bool pinned) {
  return allocate(shape, Device::kCpu, dtype, pinned, "Tensor::empty_host");
}

Tensor Tensor::zeros(Shape4 shape, Device device, DType dtype) {
  Tensor t = empty(shape, device, dtype);
  t.zero();
  return t;
}

Tensor Tensor::from_vector(const std::vector<float>& values, Shape4 shape) {
  if (static_cast<int64_t>(values.size()) != shape.numel())
    throw ShapeError(detail::concat("Tensor::from_vector: ", values.size(), " values for shape ", shape.str()));
  Tensor t = empty(shape);
  if (!values.empty()) std::memcpy(t.raw(), values.data(), t.bytes());
  return t;
}

Tensor Tensor::from_vector(const std::vector<int32_t>& values, Shape4 shape) {
  if (static_cast<int64_t>(values.size()) != shape.numel())
    throw ShapeError(detail::concat("Tensor::from_vector: ", values.size(), " values for shape ", shape.str()));
  Tensor t = empty(shape, Device::kCpu, DType::kI32);
  if (!values.empty()) std::memcpy(t.raw(), values.data(), t.bytes());
  return t;
}

float* Tensor::data() {
  PIPAR_CHECK(dtype_ == DType::kF32 || !storage_, "float access to an int32 tensor");
  return static_cast<float*>(raw());
}
const float* Tensor::data() const {
  PIPAR_CHECK(dtype_ == DType::kF32 || !storage_, "float access to an int32 tensor");
  return static_cast<const float*>(raw());
}
int32_t* Tensor::idata() {
  PIPAR_CHECK(dtype_ == DType::kI32 || !storage_, "int32 access to a float tensor");
  return static_cast<int32_t*>(raw());
}
const int32_t* Tensor::idata() const {
  PIPAR_CHECK(dtype_ == DType::kI32 || !storage_, "int32 access to a float tensor");
  return static_cast<const int32_t*>(raw());
}

Tensor Tensor::reshape(Shape4 shape) const {
  if (shape.numel() != numel())
    throw ShapeError(detail::concat("reshape: cannot view ", shape_.str(), " as ", shape.str()));
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::clone() const {
  if (!defined()) return {};
  Tensor t = empty(shape_, device_, dtype_);
  kernels::device_copy(device_, t.raw(), device_, raw(), bytes());
  return t;
}

Tensor Tensor::to(Device device) const {
  if (!defined()) return {};
  if (device == device_) return *this;
  Tensor t = empty(shape_, device, dtype_);
  kernels::device_copy(device, t.raw(), device_, raw(), bytes());
  return t;
}

void Tensor::zero() {
  if (!defined() || bytes() == 0) return;
  if (device_ == Device::kCpu) {
    std::memset(raw(), 0, bytes());
  } else if (const StreamRef s = kernels::current_stream(); !s.is_null()) {
    // Ordered on the thread's stream like the kernels around it (float zero bits are int zero bits too).
    kernels::fill(0.0f, View{static_cast<float*>(raw()), shape_, device_}, s);
  } else {
    std::vector<char> zeros(bytes(), 0);
    kernels::device_copy(device_, raw(), Device::kCpu, zeros.data(), bytes());
  }
}

std::vector<float> Tensor::to_vector() const {
  std::vector<float> v(static_cast<size_t>(numel()));
  if (!v.empty()) kernels::device_copy(Device::kCpu, v.data(), device_, data(), bytes());
  return v;
}

std::vector<int32_t> Tensor::to_ivector() const {
  std::vector<int32_t> v(static_cast<size_t>(numel()));
  if (!v.empty()) kernels::device_copy(Device::kCpu, v.data(), device_, idata(), bytes());
  return v;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  PIPAR_CHECK(a.size() == b.size(), "relative_error: ", a.size(), " values against ", b.size());
  double d = 0, n = 0;
  for (size_t i = 0; i < a.size(); ++i) d += (double(a[i]) - b[i]) * (double(a[i]) - b[i]), n += double(b[i]) * b[i];
  return std::sqrt(d) / std::max(std::sqrt(n), 1e-12);
}

}  // namespace pipar
