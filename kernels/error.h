// Error types shared by every PiPar library: host code throws these, with the context in the message.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace pipar {

// Base of every error PiPar throws on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A tensor shape that does not fit an op; the message names the op and the shapes.
class ShapeError : public Error {
 public:
  using Error::Error;
};
// An op or feature that this build or device does not provide.
class Unsupported : public Error {
 public:
  using Error::Error;
};
// A file that is missing, truncated or corrupt; the message names the file (and the fix).
class IoError : public Error {
 public:
  using Error::Error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace pipar

// Programming-error check: throws pipar::Error with the condition and a message (never compiled out).
#define PIPAR_CHECK(cond, ...)                                                                        \
  do {                                                                                              \
    if (!(cond))                                                                                    \
      throw ::pipar::Error(::pipar::detail::concat(__FILE__, ":", __LINE__, ": check failed: " #cond \
                                                   " — ", __VA_ARGS__));                            \
  } while (0)
