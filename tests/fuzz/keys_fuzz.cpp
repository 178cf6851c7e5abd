// libFuzzer target: the CURVE key-file readers of transport/auth.h on hostile files. Byte 0 picks the
// reader, the rest is the file: 0 → read_keypair (the file made 0600, as the reader demands of a
// secret key; with bit 2 set it stays 0644 and must be refused), 1 → read_public_key on the file,
// 2 → read_allow_list, 3 → check_z85_key and read_public_key on the bytes as a string. pipar::Error is
// the expected rejection; anything else is a bug. What is accepted must be self-consistent: 40-char
// Z85 keys, a public key that belongs to the secret key, an allow-list whose keys all check.
#include <sys/stat.h>

#include <cstdlib>
#include <string>

#include "kernels/error.h"
#include "tests/fuzz/fuzz_util.h"
#include "transport/auth.h"

namespace tp = pipar::transport;

namespace {

void check_key(const std::string& z85) {
  if (!tp::check_z85_key(z85).empty()) std::abort();  // an accepted key must pass the key check
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const uint8_t mode = data[0];
  ++data, --size;
  try {
    switch (mode & 3) {
      case 0: {
        const std::string path = pipar::fuzz::write_scratch("fuzz.key", data, size);
        const bool open_to_others = (mode & 4) != 0;
        if (::chmod(path.c_str(), open_to_others ? 0644 : 0600) != 0) std::abort();
        const tp::KeyPair kp = tp::read_keypair(path);
        if (open_to_others) std::abort();  // a secret key others can read must be refused
        check_key(kp.public_z85), check_key(kp.secret_z85);
        if (tp::curve_available() && tp::public_key_of(kp.secret_z85) != kp.public_z85) std::abort();
        break;
      }
      case 1:
        check_key(tp::read_public_key(pipar::fuzz::write_scratch("fuzz.pub", data, size)));
        break;
      case 2: {
        const tp::AllowList allow = tp::read_allow_list(pipar::fuzz::write_scratch("fuzz.allow", data, size));
        for (const tp::AllowedKey& k : allow.keys) {
          check_key(k.public_z85);
          if (allow.find(k.public_z85) == nullptr) std::abort();
        }
        break;
      }
      default: {
        const std::string s(reinterpret_cast<const char*>(data), size);
        const bool ok = tp::check_z85_key(s).empty();
        if (ok && s.size() != tp::kZ85KeyChars) std::abort();
        // A string that is not a valid key is read as a path: keep it from naming real files.
        if (ok) check_key(tp::read_public_key(s));
        break;
      }
    }
  } catch (const pipar::Error&) {
  }
  return 0;
}
