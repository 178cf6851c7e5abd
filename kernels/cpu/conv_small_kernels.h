// The small-tap convolution kernels (conv_small.h), written once over a vector type and included by
// each ISA's translation unit inside its own namespace (so that instantiations built with different
// flags never merge). The includer first includes <cstdint> and <cstring> and defines:
//   kVec  floats per vector;  Vec  a GCC vector of kVec floats;  madd(a, b, c) = a·b + c (fused where
//   the ISA has FMA: -std=c++20 turns contraction off);  splat(s) = s in every lane;  kNv  pixel
//   vectors per forward block.
// No include guard: included once per ISA namespace.

inline Vec load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  return v;
}
inline void store(float* p, const Vec& v) { std::memcpy(p, &v, sizeof(Vec)); }

// Output channels per block: 4 rows × kNv pixel vectors of accumulators in the forward pass (one col
// load feeds 4 FMAs), 4 rows × kTapBlock taps in the weight gradient (7 loads per 12 FMAs).
constexpr int kRows = 4;
constexpr int kTapBlock = 3;  // 9 and 27 taps (1 and 3 channels, 3×3) need no padding

template <int kKb>
void forward_rows(int64_t taps, const float* __restrict col, const int64_t* __restrict toff, const float* __restrict w,
                  int64_t ldw, const float* bias, float* __restrict y, int64_t ldy, int64_t pixels) {
  float bv[kKb];
  for (int r = 0; r < kKb; ++r) bv[r] = bias ? bias[r] : 0.0f;
  int64_t p = 0;
  for (; p + kNv * kVec <= pixels; p += kNv * kVec) {
    Vec acc[kKb][kNv];
#pragma GCC unroll 4
    for (int r = 0; r < kKb; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kNv; ++v) acc[r][v] = splat(bv[r]);
    for (int64_t t = 0; t < taps; ++t) {
      Vec c[kNv];
#pragma GCC unroll 8
      for (int v = 0; v < kNv; ++v) c[v] = load(col + toff[t] + p + v * kVec);
#pragma GCC unroll 4
      for (int r = 0; r < kKb; ++r) {
        const Vec wv = splat(w[r * ldw + t]);
#pragma GCC unroll 8
        for (int v = 0; v < kNv; ++v) acc[r][v] = madd(wv, c[v], acc[r][v]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kKb; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < kNv; ++v) store(y + r * ldy + p + v * kVec, acc[r][v]);
  }
  // Remaining pixels one vector at a time; the last vector is stored in part (col is readable and
  // zero past the pixels, y is not ours past them).
  for (; p < pixels; p += kVec) {
    Vec acc[kKb];
#pragma GCC unroll 4
    for (int r = 0; r < kKb; ++r) acc[r] = splat(bv[r]);
    for (int64_t t = 0; t < taps; ++t) {
      const Vec c = load(col + toff[t] + p);
#pragma GCC unroll 4
      for (int r = 0; r < kKb; ++r) acc[r] = madd(splat(w[r * ldw + t]), c, acc[r]);
    }
    const int64_t rem = pixels - p < kVec ? pixels - p : kVec;
    for (int r = 0; r < kKb; ++r) std::memcpy(y + r * ldy + p, &acc[r], sizeof(float) * rem);
  }
}

void forward(int64_t k, int64_t taps, const float* col, const int64_t* toff, const float* w, int64_t ldw,
             const float* bias, float* y, int64_t ldy, int64_t pixels) {
  int64_t r = 0;
  for (; r + kRows <= k; r += kRows)
    forward_rows<kRows>(taps, col, toff, w + r * ldw, ldw, bias ? bias + r : nullptr, y + r * ldy, ldy, pixels);
  const float* br = bias ? bias + r : nullptr;
  switch (k - r) {
    case 3: forward_rows<3>(taps, col, toff, w + r * ldw, ldw, br, y + r * ldy, ldy, pixels); break;
    case 2: forward_rows<2>(taps, col, toff, w + r * ldw, ldw, br, y + r * ldy, ldy, pixels); break;
    case 1: forward_rows<1>(taps, col, toff, w + r * ldw, ldw, br, y + r * ldy, ldy, pixels); break;
    default: break;
  }
}

template <int kKb>
void weight_rows(int64_t taps, const float* __restrict col, int64_t ldcol, const float* __restrict dy, int64_t ldy,
                 int64_t pixels, float* __restrict acc) {
  const int64_t full = pixels / kVec * kVec;
  // The partial last vector of dy, zero past the pixels (never read dy past its rows).
  Vec tail[kKb];
  for (int r = 0; r < kKb; ++r) {
    tail[r] = Vec{};
    if (full < pixels) std::memcpy(&tail[r], dy + r * ldy + full, sizeof(float) * (pixels - full));
  }
  for (int64_t t0 = 0; t0 < taps; t0 += kTapBlock) {
    Vec a[kKb][kTapBlock];
#pragma GCC unroll 4
    for (int r = 0; r < kKb; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < kTapBlock; ++u) a[r][u] = load(acc + (r * taps + t0 + u) * kVec);
    const float* c0 = col + t0 * ldcol;
    for (int64_t p = 0; p < full; p += kVec) {
      // Each dy and col vector loaded once (7 loads per 12 FMAs).
      Vec c[kTapBlock];
#pragma GCC unroll 4
      for (int u = 0; u < kTapBlock; ++u) c[u] = load(c0 + u * ldcol + p);
#pragma GCC unroll 4
      for (int r = 0; r < kKb; ++r) {
        const Vec d = load(dy + r * ldy + p);
#pragma GCC unroll 4
        for (int u = 0; u < kTapBlock; ++u) a[r][u] = madd(d, c[u], a[r][u]);
      }
    }
    if (full < pixels) {
#pragma GCC unroll 4
      for (int u = 0; u < kTapBlock; ++u) {
        const Vec c = load(c0 + u * ldcol + full);
#pragma GCC unroll 4
        for (int r = 0; r < kKb; ++r) a[r][u] = madd(tail[r], c, a[r][u]);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kKb; ++r)
#pragma GCC unroll 4
      for (int u = 0; u < kTapBlock; ++u) store(acc + (r * taps + t0 + u) * kVec, a[r][u]);
  }
}

void weight(int64_t k, int64_t taps, const float* col, int64_t ldcol, const float* dy, int64_t ldy, int64_t pixels,
            float* acc) {
  int64_t r = 0;
  for (; r + kRows <= k; r += kRows) weight_rows<kRows>(taps, col, ldcol, dy + r * ldy, ldy, pixels, acc + r * taps * kVec);
  float* ar = acc + r * taps * kVec;
  switch (k - r) {
    case 3: weight_rows<3>(taps, col, ldcol, dy + r * ldy, ldy, pixels, ar); break;
    case 2: weight_rows<2>(taps, col, ldcol, dy + r * ldy, ldy, pixels, ar); break;
    case 1: weight_rows<1>(taps, col, ldcol, dy + r * ldy, ldy, pixels, ar); break;
    default: break;
  }
}

SmallTapKernels make_kernels() { return {kVec, kTapBlock, &forward, &weight}; }
