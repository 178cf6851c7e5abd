// Owning tensors: float32 (or int32) NCHW storage on a device, 64-byte aligned. Copies of a Tensor
// share storage (like a reference); clone() makes a deep copy.
#pragma once
#include <memory>
#include <vector>

#include "kernels/stream_ref.h"
#include "kernels/tensor_view.h"

namespace pipar {

enum class DType : uint8_t { kF32, kI32 };

class Tensor {
 public:
  Tensor() = default;
  static Tensor empty(Shape4 shape, Device device = Device::kCpu, DType dtype = DType::kF32);
  static Tensor zeros(Shape4 shape, Device device = Device::kCpu, DType dtype = DType::kF32);
  // A host tensor; with `pinned`, in page-locked memory where a GPU is usable (kernels::pinned_alloc):
  // for buffers copied to the GPU every batch.
  static Tensor empty_host(Shape4 shape, DType dtype, bool pinned);
  static Tensor from_vector(const std::vector<float>& values, Shape4 shape);
  static Tensor from_vector(const std::vector<int32_t>& values, Shape4 shape);

  bool defined() const { return storage_ != nullptr; }
  Shape4 shape() const { return shape_; }
  Device device() const { return device_; }
  DType dtype() const { return dtype_; }
  int64_t numel() const { return shape_.numel(); }
  size_t bytes() const { return static_cast<size_t>(numel()) * 4; }

  float* data();
  const float* data() const;
  int32_t* idata();
  const int32_t* idata() const;
  void* raw() const { return storage_ ? storage_->ptr : nullptr; }

  View view() { return {data(), shape_, device_}; }
  ConstView view() const { return {data(), shape_, device_}; }
  IndexView iview() { return {idata(), shape_, device_}; }
  ConstIndexView iview() const { return {idata(), shape_, device_}; }

  // Same storage, another shape of the same numel (flatten is a reshape).
  Tensor reshape(Shape4 shape) const;
  Tensor clone() const;                  // deep copy on the same device
  Tensor to(Device device) const;        // deep copy on another device (or a share if already there)
  void zero();
  std::vector<float> to_vector() const;  // host copy of float data
  std::vector<int32_t> to_ivector() const;

 private:
  static Tensor allocate(Shape4 shape, Device device, DType dtype, bool pinned, const char* who);
  struct Storage {
    void* ptr = nullptr;
    size_t bytes = 0;
    Device device = Device::kCpu;
    StreamRef stream{};  // CUDA: the thread's current stream at allocation (kernels/device.h)
    bool pinned = false;  // host memory from kernels::pinned_alloc
    ~Storage();
  };
  std::shared_ptr<Storage> storage_;
  Shape4 shape_{0, 0, 0, 0};
  Device device_ = Device::kCpu;
  DType dtype_ = DType::kF32;
};

// ||a - b|| / ||b|| over two equally long value lists (b's norm floored at 1e-12): how far one
// backend's result is from another's.
double relative_error(const std::vector<float>& a, const std::vector<float>& b);

}  // namespace pipar
