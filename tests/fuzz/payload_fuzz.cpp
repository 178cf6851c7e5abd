// libFuzzer target: the JSON payloads the server decodes out of device messages, past the codec:
// Hello.profile (planner::Profile::from_json, which feeds the cost model) and RoundEnd.details
// (events_from_json, the device's trace events). Byte 0 picks: even → the rest is a profile, odd →
// trace events. A profile that parses must validate, answer the cost model's byte and time queries
// without overflow (UBSan) and survive to_json → from_json unchanged. pipar::Error is the expected
// rejection; anything else is a bug.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "kernels/error.h"
#include "planner/profile.h"
#include "runtime/trace.h"

namespace {

void profile(const std::string& text) {
  pipar::planner::Profile p;
  try {
    p = pipar::planner::Profile::from_json(text);
  } catch (const pipar::Error&) {
    return;
  }
  const size_t blocks = p.num_blocks();
  for (size_t s = 1; s < blocks; ++s) (void)(p.activation_bytes(s) + p.gradient_bytes(s));
  (void)(p.param_bytes(0, blocks) + p.state_bytes(0, blocks) + p.tape_bytes(0, blocks));
  for (double m : {0.0, 1.0, 3.5, 1e6}) (void)(p.forward_s(0, blocks, m) + p.backward_s(0, blocks, m) + p.loss_time_s(m));
  (void)p.step_s(0, blocks);
  const std::string once = p.to_json();
  std::string twice;
  try {
    twice = pipar::planner::Profile::from_json(once).to_json();
  } catch (const pipar::Error& e) {
    std::fprintf(stderr, "re-encoded profile does not parse: %s\n", e.what());
    std::abort();
  }
  if (twice != once) {
    std::fprintf(stderr, "from_json(to_json(p)) differs:\n%s\n%s\n", once.c_str(), twice.c_str());
    std::abort();
  }
}

void trace_events(const std::string& text) {
  try {
    (void)pipar::events_from_json(text);
  } catch (const pipar::Error&) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] % 2 == 0) profile(text);
  else trace_events(text);
  return 0;
}
