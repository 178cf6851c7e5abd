// Non-owning reference to a CUDA stream, declared without CUDA headers so that runtime/ and planner/
// compile in a CPU-only build. A default StreamRef means "the op's own choice" on CPU and is refused
// by CUDA ops, which always run on an explicit stream.
#pragma once

struct CUstream_st;  // what cudaStream_t points to

namespace pipar {

struct StreamRef {
  CUstream_st* native = nullptr;
  constexpr bool is_null() const { return native == nullptr; }
};

}  // namespace pipar
