// Key files and allow-lists for CURVE links: generation (zmq_curve_keypair), exclusive creation with
// mode 0600 for secrets, and readers that check permissions, lengths and Z85 before a key is used.
#include "transport/auth.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

#include <cerrno>
#include <cstring>
#include <set>

#include "kernels/error.h"

namespace pipar::transport {

namespace {

constexpr size_t kMaxKeyFileBytes = 64 << 10;        // key files are a few lines
constexpr size_t kMaxAllowListBytes = 64 << 20;      // ~1M devices
constexpr char kZ85Alphabet[] =
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

std::string trim(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r')) --e;
  return s.substr(b, e - b);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

[[noreturn]] void io_fail(const std::string& path, const std::string& what) {
  throw IoError(detail::concat("key file ", path, ": ", what));
}

// Reads a whole (small) file through an open descriptor; `secret` additionally refuses group/other access.
std::string read_small_file(const std::string& path, size_t max_bytes, bool secret, const char* kind) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    throw IoError(detail::concat(kind, " ", path, ": cannot open: ", std::strerror(err),
                                 err == ENOENT ? (secret ? " (create one with: pipar keygen --out NAME)" : "") : ""));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st{};
  if (::fstat(fd, &st) != 0) throw IoError(detail::concat(kind, " ", path, ": cannot stat: ", std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) throw IoError(detail::concat(kind, " ", path, ": not a regular file"));
  if (secret && (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw IoError(detail::concat(kind, " ", path, ": refusing a secret key that others can access (mode ", mode,
                                 "); fix with: chmod 600 ", path));
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    throw IoError(detail::concat(kind, " ", path, ": ", st.st_size, " bytes, larger than the ", max_bytes, "-byte limit"));
  std::string data;
  char buf[4096];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IoError(detail::concat(kind, " ", path, ": read failed: ", std::strerror(errno)));
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > max_bytes) throw IoError(detail::concat(kind, " ", path, ": larger than the ", max_bytes, "-byte limit"));
  }
  return data;
}

std::vector<std::string> split_lines(const std::string& data) {
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= data.size()) {
    size_t nl = data.find('\n', start);
    if (nl == std::string::npos) nl = data.size();
    lines.push_back(data.substr(start, nl - start));
    start = nl + 1;
  }
  return lines;
}

// "name = value" lines of a key file (comments and blank lines skipped); unknown names are errors.
std::pair<std::string, std::string> key_file_fields(const std::string& path, const std::string& data) {
  std::string pub, sec;
  int lineno = 0;
  for (const std::string& raw : split_lines(data)) {
    ++lineno;
    const std::string line = trim(raw);
    if (line.empty() || line[0] == '#') continue;
    const size_t eq = line.find('=');
    if (eq == std::string::npos) io_fail(path, detail::concat("line ", lineno, ": expected 'public-key = ...' or 'secret-key = ...'"));
    const std::string name = trim(line.substr(0, eq)), value = trim(line.substr(eq + 1));
    std::string* slot = name == "public-key" ? &pub : name == "secret-key" ? &sec : nullptr;
    if (!slot) io_fail(path, detail::concat("line ", lineno, ": unknown field '", name, "'"));
    if (!slot->empty()) io_fail(path, detail::concat("line ", lineno, ": '", name, "' given twice"));
    if (auto why = check_z85_key(value); !why.empty()) io_fail(path, detail::concat("line ", lineno, ": ", name, ": ", why));
    *slot = value;
  }
  return {pub, sec};
}

// PREFIX from "dir/", an existing directory, "NAME", "NAME.key" or "NAME.pub".
std::string key_prefix(const std::string& dir_or_prefix) {
  PIPAR_CHECK(!dir_or_prefix.empty(), "empty key file prefix");
  struct stat st{};
  if (dir_or_prefix.back() == '/' || (::stat(dir_or_prefix.c_str(), &st) == 0 && S_ISDIR(st.st_mode)))
    return dir_or_prefix + (dir_or_prefix.back() == '/' ? "" : "/") + "pipar";
  if (ends_with(dir_or_prefix, ".key") || ends_with(dir_or_prefix, ".pub")) return dir_or_prefix.substr(0, dir_or_prefix.size() - 4);
  return dir_or_prefix;
}

// Creates `path` exclusively with `mode` (fchmod after open, so the umask cannot widen or narrow it) and writes `text`.
void write_new_file(const std::string& path, const std::string& text, mode_t mode) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) {
    const int err = errno;
    throw IoError(detail::concat("key file ", path, ": cannot create: ", std::strerror(err),
                                 err == EEXIST ? " (refusing to overwrite an existing key; remove it first or pick another name)" : ""));
  }
  bool ok = ::fchmod(fd, mode) == 0;
  size_t off = 0;
  while (ok && off < text.size()) {
    const ssize_t n = ::write(fd, text.data() + off, text.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ok = false;
    else off += static_cast<size_t>(n);
  }
  ok = ok && ::fsync(fd) == 0;
  const int err = errno;
  ok = ::close(fd) == 0 && ok;
  if (!ok) {
    ::unlink(path.c_str());
    throw IoError(detail::concat("key file ", path, ": write failed: ", std::strerror(err)));
  }
}

}  // namespace

// --- keys

bool curve_available() { return zmq_has("curve") != 0; }

void require_curve() {
  if (!curve_available())
    throw Unsupported(
        "transport: this libzmq was built without CURVE (libsodium), so links cannot be authenticated or "
        "encrypted; install a libzmq with CURVE support (Debian's libzmq5 has it) or run with --insecure");
}

std::string check_z85_key(const std::string& z85) {
  if (z85.size() != kZ85KeyChars)
    return detail::concat("a CURVE key is ", kZ85KeyChars, " Z85 characters, got ", z85.size());
  for (char c : z85)
    if (c == '\0' || std::strchr(kZ85Alphabet, c) == nullptr) return detail::concat("character '", c, "' is not Z85");
  uint8_t raw[32];
  if (zmq_z85_decode(raw, z85.c_str()) == nullptr) return "not valid Z85";
  return {};
}

KeyPair generate_keypair() {
  require_curve();
  char pub[kZ85KeyChars + 1], sec[kZ85KeyChars + 1];
  if (zmq_curve_keypair(pub, sec) != 0) throw Error(detail::concat("transport: zmq_curve_keypair failed: ", zmq_strerror(zmq_errno())));
  KeyPair k{pub, sec};
  std::memset(sec, 0, sizeof sec);
  return k;
}

std::string public_key_of(const std::string& secret_z85) {
  require_curve();
  if (auto why = check_z85_key(secret_z85); !why.empty()) throw Error("transport: bad secret key: " + why);
  char pub[kZ85KeyChars + 1];
  if (zmq_curve_public(pub, secret_z85.c_str()) != 0)
    throw Error(detail::concat("transport: zmq_curve_public failed: ", zmq_strerror(zmq_errno())));
  return pub;
}

std::string write_keypair(const std::string& dir_or_prefix, const KeyPair& keys) {
  if (auto why = check_z85_key(keys.public_z85); !why.empty()) throw Error("transport: bad public key: " + why);
  if (auto why = check_z85_key(keys.secret_z85); !why.empty()) throw Error("transport: bad secret key: " + why);
  const std::string prefix = key_prefix(dir_or_prefix);
  const std::string key_path = prefix + ".key", pub_path = prefix + ".pub";
  write_new_file(key_path,
                 detail::concat("# pipar CURVE secret key (ZeroMQ Z85). Keep it private: mode 0600, never share or commit it.\n",
                                "# Give the matching ", pub_path, " to the other side.\n",
                                "public-key = ", keys.public_z85, "\n", "secret-key = ", keys.secret_z85, "\n"),
                 0600);
  try {
    write_new_file(pub_path,
                   detail::concat("# pipar CURVE public key (ZeroMQ Z85). Safe to share: a server lists device keys in its\n",
                                  "# allow-list (\"KEY [DEVICE] # comment\"); devices take the server's with --server-key.\n",
                                  "public-key = ", keys.public_z85, "\n"),
                   0644);
  } catch (...) {
    ::unlink(key_path.c_str());
    throw;
  }
  return key_path;
}

KeyPair read_keypair(const std::string& path) {
  const std::string file = ends_with(path, ".pub") ? path.substr(0, path.size() - 4) + ".key" : path;
  struct stat st{};
  const std::string resolved = (::stat(file.c_str(), &st) != 0 && !ends_with(file, ".key")) ? file + ".key" : file;
  const std::string data = read_small_file(resolved, kMaxKeyFileBytes, true, "secret key file");
  auto [pub, sec] = key_file_fields(resolved, data);
  if (sec.empty()) io_fail(resolved, "no 'secret-key = ...' line (is this a .pub file? pass the .key file)");
  const std::string derived = public_key_of(sec);
  if (!pub.empty() && pub != derived) io_fail(resolved, "the public-key line does not belong to the secret key");
  return KeyPair{derived, sec};
}

std::string read_public_key(const std::string& path_or_key) {
  struct stat st{};
  if (::stat(path_or_key.c_str(), &st) != 0 && check_z85_key(path_or_key).empty()) return path_or_key;  // the key itself
  const std::string data = read_small_file(path_or_key, kMaxKeyFileBytes, false, "public key file");
  auto [pub, sec] = key_file_fields(path_or_key, data);
  if (pub.empty() && !sec.empty()) pub = public_key_of(sec);
  if (pub.empty()) io_fail(path_or_key, "no 'public-key = ...' line");
  return pub;
}

// --- allow-list

const AllowedKey* AllowList::find(const std::string& public_z85) const {
  for (const auto& k : keys)
    if (k.public_z85 == public_z85) return &k;
  return nullptr;
}

AllowList read_allow_list(const std::string& path) {
  const std::string data = read_small_file(path, kMaxAllowListBytes, false, "allow-list");
  AllowList out;
  std::set<std::string> seen;
  int lineno = 0;
  auto fail = [&](const std::string& what) -> void {
    throw IoError(detail::concat("allow-list ", path, ": line ", lineno, ": ", what,
                                 " (expected '<40-char Z85 public key> [DEVICE] [# comment]')"));
  };
  for (const std::string& raw : split_lines(data)) {
    ++lineno;
    std::string line = trim(raw);
    if (line.empty() || line[0] == '#') continue;
    AllowedKey k;
    // The key is the first 40 characters: Z85 has '#' in its alphabet, so comments only start after it.
    const size_t key_end = line.find_first_of(" \t");
    k.public_z85 = line.substr(0, key_end);
    if (auto why = check_z85_key(k.public_z85); !why.empty()) fail(why);
    std::string rest = key_end == std::string::npos ? std::string() : trim(line.substr(key_end));
    if (!rest.empty() && rest[0] != '#') {
      const size_t tok_end = rest.find_first_of(" \t#");
      const std::string dev = rest.substr(0, tok_end);
      uint64_t v = 0;
      if (dev.size() > 10) fail("device id '" + dev + "' is not a 32-bit number");
      for (char c : dev) {
        if (c < '0' || c > '9') fail("device id '" + dev + "' is not a number");
        v = v * 10 + static_cast<uint64_t>(c - '0');
      }
      if (v > UINT32_MAX) fail("device id '" + dev + "' is not a 32-bit number");
      k.device = static_cast<uint32_t>(v);
      rest = tok_end == std::string::npos ? std::string() : trim(rest.substr(tok_end));
    }
    if (!rest.empty()) {
      if (rest[0] != '#') fail("unexpected text '" + rest + "' (comments start with '#')");
      k.comment = trim(rest.substr(1));
    }
    if (!seen.insert(k.public_z85).second) fail("key " + k.public_z85 + " listed twice");
    out.keys.push_back(std::move(k));
  }
  return out;
}

const char* plain_warning() {
  return "WARNING: --insecure: links are NOT authenticated or encrypted. Anyone who can reach the port can "
         "join as any device, read activations, gradients and weights, and inject messages. Use only on a "
         "trusted network or for local tests; otherwise create keys with 'pipar keygen' and pass --keys.";
}

}  // namespace pipar::transport
