// Non-owning views of tensor memory: data pointer, NCHW shape, device. Every op takes these.
// Layout: float32 (or int32 for indices), contiguous NCHW; element (n,c,h,w) lives at
// ((n*C + c)*H + h)*W + w. A matrix [rows, cols] is Shape4{rows, cols, 1, 1}; a vector of c is {c,1,1,1}.
#pragma once
#include <cstdint>
#include <string>
#include <type_traits>

namespace pipar {

enum class Device : uint8_t { kCpu, kCuda };
const char* device_name(Device d);

struct Shape4 {
  int64_t n = 1, c = 1, h = 1, w = 1;
  constexpr int64_t numel() const { return n * c * h * w; }
  constexpr int64_t per_sample() const { return c * h * w; }
  constexpr bool operator==(const Shape4&) const = default;
  std::string str() const;  // "[n, c, h, w]"
};

template <class T>
struct BasicView {
  T* data = nullptr;
  Shape4 shape{0, 0, 0, 0};
  Device device = Device::kCpu;

  constexpr int64_t numel() const { return shape.numel(); }
  constexpr bool empty() const { return data == nullptr; }
  // View → ConstView conversion.
  template <class U>
  constexpr operator BasicView<const U>() const requires(std::is_same_v<T, U>) {
    return {data, shape, device};
  }
};

using View = BasicView<float>;
using ConstView = BasicView<const float>;
using IndexView = BasicView<int32_t>;
using ConstIndexView = BasicView<const int32_t>;

}  // namespace pipar
