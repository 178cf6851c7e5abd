// CURVE key handling for the links: key pairs (generate, write with safe permissions, read back with
// checks), the server's allow-list of device public keys, and the per-link Security settings that
// LinkOptions carries. Bad files throw pipar::Error naming the file and what to do about it.
//
// Key files ("pipar keygen --out NAME" writes both):
//   NAME.key  mode 0600, the secret key:   "# pipar CURVE secret key ..." comment lines, then
//             "public-key = <40 Z85 chars>" and "secret-key = <40 Z85 chars>"
//   NAME.pub  mode 0644, the public key:   comment lines, then "public-key = <40 Z85 chars>"
// Allow-list (the server's): one device per line, "<40-char Z85 public key> [DEVICE] [# comment]",
// blank lines and lines starting with '#' ignored. DEVICE (decimal) binds the key to that device id:
// a connection with that key can only speak as routing id "pipar-dev-DEVICE". Without it the key may
// use any device id.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace pipar::transport {

inline constexpr size_t kZ85KeyChars = 40;  // a 32-byte CURVE key in Z85

struct KeyPair {
  std::string public_z85, secret_z85;
};

struct AllowedKey {
  std::string public_z85;
  std::optional<uint32_t> device;  // (optional) the only device id this key may use
  std::string comment;             // text after '#' on the line, trimmed
};

struct AllowList {
  std::vector<AllowedKey> keys;
  // The entry for a public key (Z85), or nullptr.
  const AllowedKey* find(const std::string& public_z85) const;
};

// CURVE settings of one link (LinkOptions::security). Server: `keys` + `allow`. DeviceLink: `keys` +
// `server_public_z85`. A link with security set refuses to start when libzmq lacks CURVE.
struct Security {
  KeyPair keys;                   // this end's key pair
  AllowList allow;                // Server: devices admitted (empty = nobody)
  std::string server_public_z85;  // DeviceLink: the server's public key
};

// True when libzmq was built with CURVE (libsodium); require_curve() throws a clear error otherwise.
bool curve_available();
void require_curve();

// A fresh key pair (zmq_curve_keypair).
KeyPair generate_keypair();
// The public key of a secret key (zmq_curve_public); throws on a malformed key.
std::string public_key_of(const std::string& secret_z85);
// Writes PREFIX.key (0600, created exclusively: an existing file is an error, never overwritten) and
// PREFIX.pub (0644). PREFIX may be a directory ("keys/") → keys/pipar.key; ".key"/".pub" suffixes are
// stripped. Returns the path of the secret file.
std::string write_keypair(const std::string& dir_or_prefix, const KeyPair& keys);
// Reads a secret key file (PREFIX.key or the path itself). Refuses a file readable or writable by
// group/others (names the chmod fix), a missing file, bad lengths, bad Z85, a public key that does not
// belong to the secret key.
KeyPair read_keypair(const std::string& path);
// Reads a public key: a .pub file, a .key file (its public-key line), or the 40-char key itself.
std::string read_public_key(const std::string& path_or_key);
// Reads an allow-list file (format above); errors name the file and line. Duplicate keys are errors.
AllowList read_allow_list(const std::string& path);
// Checks a Z85 key: 40 chars of the Z85 alphabet that decode to 32 bytes; "" or the reason.
std::string check_z85_key(const std::string& z85);

// The warning the CLI prints when run with --insecure (plain links: no authentication, no encryption).
const char* plain_warning();

}  // namespace pipar::transport
