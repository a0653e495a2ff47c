// Fused unpack + matmul CPU kernels for quept's bit-plane packed codes (qgemv, qdequant) and
// its quantized KV cache (kv_quantize, kv_attend). Built on first use by quept.ops.kernels.load()
// through torch.utils.cpp_extension.load_inline (extension quept_qgemv_*), which adds the Python
// bindings: this file has no PYBIND11_MODULE of its own.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {
constexpr int kMaxRows = 8;

// Adds plane P (values < 2^P, stored at bit offset `shift` of the code) of chunk t to code[8].
template <int P>
inline void add_plane(int32_t* code, const uint8_t* plane, int64_t t, int shift) {
  if constexpr (P > 0) {
    constexpr int kPer = 8 / P;
    constexpr int kMask = (1 << P) - 1;
    const uint8_t* b = plane + (t / kPer) * 8;
    const int s = P * static_cast<int>(t % kPer);
    for (int i = 0; i < 8; ++i) code[i] |= ((b[i] >> s) & kMask) << shift;
  }
}

template <int P0, int P1, int P2>
inline void decode(float* out, const uint8_t* row, int64_t t, int64_t npad) {
  int32_t code[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const int64_t off1 = npad * P0 / 8, off2 = off1 + npad * P1 / 8;
  add_plane<P0>(code, row, t, 0);
  add_plane<P1>(code, row + off1, t, P0);
  add_plane<P2>(code, row + off2, t, P0 + P1);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<float>(code[i]);
}

template <int P0, int P1, int P2>
void gemv(const float* x, int64_t M, int64_t K, const uint8_t* q, int64_t row_bytes,
          int64_t npad, const float* sc, const float* zs, const float* xs, int64_t G, int64_t gs,
          float* y, int64_t N) {
  const int64_t chunks = K / 8, per_group = gs / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * row_bytes;
      float acc[kMaxRows][8] = {}, tot[kMaxRows][8] = {};
      float cf[8];
      for (int64_t t = 0; t < chunks; ++t) {
        decode<P0, P1, P2>(cf, row, t, npad);
        for (int64_t m = 0; m < M; ++m) {
          const float* xm = x + m * K + t * 8;
          for (int i = 0; i < 8; ++i) acc[m][i] += xm[i] * cf[i];
        }
        if ((t + 1) % per_group == 0) {
          const float s = sc[n * G + t / per_group];
          for (int64_t m = 0; m < M; ++m)
            for (int i = 0; i < 8; ++i) { tot[m][i] += s * acc[m][i]; acc[m][i] = 0.f; }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        float sum = 0.f;
        for (int i = 0; i < 8; ++i) sum += tot[m][i];
        for (int64_t g = 0; g < G; ++g) sum += zs[n * G + g] * xs[m * G + g];
        y[m * N + n] = sum;
      }
    }
  });
}

template <int P0, int P1, int P2>
void dequant(const uint8_t* q, int64_t row_bytes, int64_t npad, const float* sc, const float* zs,
             int64_t G, int64_t gs, float* w, int64_t N, int64_t K) {
  const int64_t chunks = K / 8, per_group = gs / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * row_bytes;
      float* out = w + n * K;
      for (int64_t t = 0; t < chunks; ++t) {
        const int64_t g = n * G + t / per_group;
        float cf[8];
        decode<P0, P1, P2>(cf, row, t, npad);
        for (int i = 0; i < 8; ++i) out[t * 8 + i] = sc[g] * cf[i] + zs[g];
      }
    }
  });
}

// out = in @ hm for one row of D values (hm: D x D), or a copy of it without hm.
inline void times_rotation(const float* in, const float* hm, int64_t D, float* out) {
  if (hm) {
    for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
    for (int64_t e = 0; e < D; ++e)
      for (int64_t d = 0; d < D; ++d) out[d] += in[e] * hm[e * D + d];
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = in[d];
  }
}

// Quantizes rows of keys and values for a KV cache (quept.ops.quant.quantize_kv, then
// quept.ops.pack.pack): each head of D values, rotated by hm (x @ hm) when given, on its own
// asymmetric min/max grid of `bits` bits; the row's codes are packed in the bit-plane layout,
// and `deq` gets the values the codes stand for (rotated back).
template <int P0, int P1, int P2>
void kv_quantize_rows(const float* x, int64_t N, int64_t W, int64_t D, const float* hm,
                      int64_t npad, uint8_t* packed, float* sc, float* zr, float* deq) {
  constexpr int bits = P0 + P1 + P2;
  const int64_t heads = W / D, row_bytes = npad * bits / 8;
  const float qmax = static_cast<float>((1 << bits) - 1);
  const int widths[3] = {P0, P1, P2};
  const int nplanes = P2 ? 3 : (P1 ? 2 : 1);
  at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
    std::vector<uint8_t> code(npad);
    std::vector<float> y(D), qd(D);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(code.begin(), code.end(), 0);
      for (int64_t h = 0; h < heads; ++h) {
        times_rotation(x + n * W + h * D, hm, D, y.data());
        float lo = y[0], hi = y[0];
        for (int64_t d = 1; d < D; ++d) { lo = std::min(lo, y[d]); hi = std::max(hi, y[d]); }
        const float s = std::max((hi - lo) / qmax, 1e-8f);
        const float z = std::nearbyint(-lo / s);
        sc[n * heads + h] = s;
        zr[n * heads + h] = z;
        for (int64_t d = 0; d < D; ++d) {
          const float c = std::min(std::max(std::nearbyint(y[d] / s) + z, 0.f), qmax);
          code[h * D + d] = static_cast<uint8_t>(c);
          qd[d] = (c - z) * s;
        }
        times_rotation(qd.data(), hm, D, deq + n * W + h * D);
      }
      uint8_t* dst = packed + n * row_bytes;
      int shift = 0;
      for (int k = 0; k < nplanes; ++k) {
        const int p = widths[k], per = 8 / p, mask = (1 << p) - 1;
        const int64_t plane_bytes = npad * p / 8;
        for (int64_t b = 0; b < plane_bytes; ++b) {
          const int64_t sb = b / 8, i = b % 8;
          int v = 0;
          for (int j = 0; j < per; ++j)
            v |= ((code[(sb * per + j) * 8 + i] >> shift) & mask) << (p * j);
          dst[b] = static_cast<uint8_t>(v);
        }
        dst += plane_bytes;
        shift += p;
      }
    }
  });
}

inline float dot8(const float* a, const float* b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t d = 0; d < n; d += 8)
    for (int k = 0; k < 8; ++k) acc[k] += a[d + k] * b[d + k];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// One new token's attention per (batch, KV head) over dequantized cached rows `kv` (B * T rows
// of 2H heads of D: keys, then values, in the quantizer's basis) and the new token's key and
// value (nk, nv: B, H, D): queries qr (rotated into the codes' basis, for the past) and qn (for
// the new key), (B, H, G, D), scaled; the weighted sum of the past values is rotated back by hm.
// The G queries of a KV head share each row while it is in cache.
void kv_attend_rows(const float* qr, const float* qn, const float* kv, const float* nk,
                    const float* nv, const float* mask, const float* hm, int64_t B, int64_t T,
                    int64_t H, int64_t G, int64_t D, float* out) {
  const int64_t L = T + 1, W = 2 * H * D;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(G * L), acc(G * D), mx(G), tot(G);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const float* q = qr + i * G * D;
      const float* kb = kv + b * T * W + h * D;
      std::fill(mx.begin(), mx.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < T; ++t) {
        const float m = mask ? mask[b * L + t] : 0.f;
        const float* k = kb + t * W;
        for (int64_t g = 0; g < G; ++g) {
          const float x = dot8(q + g * D, k, D) + m;
          p[g * L + t] = x;
          mx[g] = std::max(mx[g], x);
        }
      }
      const float* k1 = nk + i * D;
      for (int64_t g = 0; g < G; ++g) {
        const float x = dot8(qn + (i * G + g) * D, k1, D) + (mask ? mask[b * L + T] : 0.f);
        p[g * L + T] = x;
        mx[g] = std::max(mx[g], x);
        float sum = 0.f;
        for (int64_t t = 0; t < L; ++t) {
          const float e = std::exp(p[g * L + t] - mx[g]);
          p[g * L + t] = e;
          sum += e;
        }
        tot[g] = sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* vb = kb + H * D;
      for (int64_t t = 0; t < T; ++t) {
        const float* v = vb + t * W;
        for (int64_t g = 0; g < G; ++g) {
          const float w = p[g * L + t];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * v[d];
        }
      }
      const float* v1 = nv + i * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* a = acc.data() + g * D;
        float* o = out + (i * G + g) * D;
        const float pn = p[g * L + T], inv = 1.f / tot[g];
        times_rotation(a, hm, D, o);
        for (int64_t d = 0; d < D; ++d) o[d] = (o[d] + pn * v1[d]) * inv;
      }
    }
  });
}

#if defined(__AVX2__) && defined(__FMA__)
#define QUEPT_AVX2 1
#include <immintrin.h>

// Ors plane P (stored at code bit offset OFF) of one 64-code block into c[8] (8 codes each).
template <int P, int OFF>
inline void plane_block(__m256i* c, const uint8_t* src) {
  if constexpr (P > 0) {
    constexpr int kPer = 8 / P;
    const __m256i mask = _mm256_set1_epi32((1 << P) - 1);
    for (int sb = 0; sb < P; ++sb) {
      const __m256i w = _mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + 8 * sb)));
      for (int j = 0; j < kPer; ++j) {
        __m256i v = P == 8 ? w : _mm256_and_si256(_mm256_srli_epi32(w, P * j), mask);
        if constexpr (OFF > 0) v = _mm256_slli_epi32(v, OFF);
        c[sb * kPer + j] = _mm256_or_si256(c[sb * kPer + j], v);
      }
    }
  }
}

// Codes of block b of a row as 8 float vectors.
template <int P0, int P1, int P2>
inline void block_floats(__m256* f, const uint8_t* row, int64_t b, int64_t off1, int64_t off2) {
  __m256i c[8];
  for (int t = 0; t < 8; ++t) c[t] = _mm256_setzero_si256();
  plane_block<P0, 0>(c, row + b * 8 * P0);
  plane_block<P1, P0>(c, row + off1 + b * 8 * P1);
  plane_block<P2, P0 + P1>(c, row + off2 + b * 8 * P2);
  for (int t = 0; t < 8; ++t) f[t] = _mm256_cvtepi32_ps(c[t]);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One activation row (decode): K % 64 == 0, group size a multiple of 32.
template <int P0, int P1, int P2>
void gemv1(const float* x, int64_t K, const uint8_t* q, int64_t row_bytes, int64_t npad,
           const float* sc, const float* zs, const float* xs, int64_t G, int64_t gs, float* y,
           int64_t N) {
  const int64_t blocks = K / 64, halves_per_group = gs / 32;
  const int64_t off1 = npad * P0 / 8, off2 = off1 + npad * P1 / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * row_bytes;
      const float* s = sc + n * G;
      __m256 tot = _mm256_setzero_ps(), acc0 = tot, acc1 = tot;
      int64_t half = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        __m256 f[8];
        block_floats<P0, P1, P2>(f, row, b, off1, off2);
        const float* xb = x + b * 64;
        for (int h = 0; h < 2; ++h, ++half) {
          acc0 = _mm256_fmadd_ps(f[4 * h], _mm256_loadu_ps(xb + 32 * h), acc0);
          acc1 = _mm256_fmadd_ps(f[4 * h + 1], _mm256_loadu_ps(xb + 32 * h + 8), acc1);
          acc0 = _mm256_fmadd_ps(f[4 * h + 2], _mm256_loadu_ps(xb + 32 * h + 16), acc0);
          acc1 = _mm256_fmadd_ps(f[4 * h + 3], _mm256_loadu_ps(xb + 32 * h + 24), acc1);
          if ((half + 1) % halves_per_group == 0) {
            tot = _mm256_fmadd_ps(_mm256_add_ps(acc0, acc1),
                                  _mm256_set1_ps(s[half / halves_per_group]), tot);
            acc0 = acc1 = _mm256_setzero_ps();
          }
        }
      }
      float sum = hsum(tot);
      for (int64_t g = 0; g < G; ++g) sum += zs[n * G + g] * xs[g];
      y[n] = sum;
    }
  });
}

template <int P0, int P1, int P2>
void dequant_avx2(const uint8_t* q, int64_t row_bytes, int64_t npad, const float* sc,
                  const float* zs, int64_t G, int64_t gs, float* w, int64_t N, int64_t K) {
  const int64_t blocks = K / 64, halves_per_group = gs / 32;
  const int64_t off1 = npad * P0 / 8, off2 = off1 + npad * P1 / 8;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = q + n * row_bytes;
      float* out = w + n * K;
      for (int64_t b = 0; b < blocks; ++b) {
        __m256 f[8];
        block_floats<P0, P1, P2>(f, row, b, off1, off2);
        for (int h = 0; h < 2; ++h) {
          const int64_t g = n * G + (2 * b + h) / halves_per_group;
          const __m256 s = _mm256_set1_ps(sc[g]), z = _mm256_set1_ps(zs[g]);
          for (int t = 0; t < 4; ++t)
            _mm256_storeu_ps(out + b * 64 + 32 * h + 8 * t, _mm256_fmadd_ps(f[4 * h + t], s, z));
        }
      }
    }
  });
}
#endif

bool fast_shape(int64_t K, int64_t gs) {
#ifdef QUEPT_AVX2
  return K % 64 == 0 && gs % 32 == 0;
#else
  return false;
#endif
}

#define QUEPT_DISPATCH(BITS, FN, ...)                                              \
  switch (BITS) {                                                                  \
    case 2: FN<2, 0, 0>(__VA_ARGS__); break;                                       \
    case 3: FN<2, 1, 0>(__VA_ARGS__); break;                                       \
    case 4: FN<4, 0, 0>(__VA_ARGS__); break;                                       \
    case 5: FN<4, 1, 0>(__VA_ARGS__); break;                                       \
    case 6: FN<4, 2, 0>(__VA_ARGS__); break;                                       \
    case 7: FN<4, 2, 1>(__VA_ARGS__); break;                                       \
    case 8: FN<8, 0, 0>(__VA_ARGS__); break;                                       \
    default: TORCH_CHECK(false, "quept kernel: unsupported width ", BITS);        \
  }

void check(const at::Tensor& q, const at::Tensor& sc, const at::Tensor& zs, int64_t K,
           int64_t gs, int64_t npad, int64_t bits) {
  TORCH_CHECK(q.dtype() == at::kByte && q.is_contiguous() && q.dim() == 2, "codes: uint8 2-D");
  TORCH_CHECK(sc.dtype() == at::kFloat && zs.dtype() == at::kFloat, "scales: float32");
  TORCH_CHECK(sc.is_contiguous() && zs.is_contiguous(), "scales: contiguous");
  TORCH_CHECK(K % 8 == 0 && gs % 8 == 0 && K % gs == 0, "K and group size: multiples of 8");
  TORCH_CHECK(sc.size(0) == q.size(0) && sc.size(1) == K / gs, "scales: (N, K / gs)");
  TORCH_CHECK(q.size(1) == npad * bits / 8, "codes: wrong packed row length");
}
}  // namespace

at::Tensor qgemv(const at::Tensor& x, const at::Tensor& q, const at::Tensor& sc,
                 const at::Tensor& zs, int64_t bits, int64_t K, int64_t gs, int64_t npad) {
  check(q, sc, zs, K, gs, npad, bits);
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == K,
              "x: float32 (M, K) contiguous");
  const int64_t M = x.size(0), N = q.size(0), G = K / gs;
  TORCH_CHECK(M <= kMaxRows, "qgemv takes at most ", kMaxRows, " rows");
  const float* xp = x.data_ptr<float>();
  std::vector<float> xs(M * G, 0.f);  // per-group sums of x, for the zero-point term
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xs[m * G + k / gs] += xp[m * K + k];
  auto y = at::empty({M, N}, x.options());
#ifdef QUEPT_AVX2
  if (M == 1 && fast_shape(K, gs)) {
    QUEPT_DISPATCH(bits, gemv1, xp, K, q.data_ptr<uint8_t>(), q.size(1), npad,
                   sc.data_ptr<float>(), zs.data_ptr<float>(), xs.data(), G, gs,
                   y.data_ptr<float>(), N);
    return y;
  }
#endif
  QUEPT_DISPATCH(bits, gemv, xp, M, K, q.data_ptr<uint8_t>(), q.size(1), npad,
                 sc.data_ptr<float>(), zs.data_ptr<float>(), xs.data(), G, gs,
                 y.data_ptr<float>(), N);
  return y;
}

void qdequant(const at::Tensor& q, const at::Tensor& sc, const at::Tensor& zs, int64_t bits,
              int64_t K, int64_t gs, int64_t npad, at::Tensor& out) {
  check(q, sc, zs, K, gs, npad, bits);
  TORCH_CHECK(out.dtype() == at::kFloat && out.is_contiguous() && out.numel() == q.size(0) * K,
              "out: float32 (N, K) contiguous");
#ifdef QUEPT_AVX2
  if (fast_shape(K, gs)) {
    QUEPT_DISPATCH(bits, dequant_avx2, q.data_ptr<uint8_t>(), q.size(1), npad,
                   sc.data_ptr<float>(), zs.data_ptr<float>(), K / gs, gs, out.data_ptr<float>(),
                   q.size(0), K);
    return;
  }
#endif
  QUEPT_DISPATCH(bits, dequant, q.data_ptr<uint8_t>(), q.size(1), npad, sc.data_ptr<float>(),
                 zs.data_ptr<float>(), K / gs, gs, out.data_ptr<float>(), q.size(0), K);
}
std::vector<at::Tensor> kv_quantize(const at::Tensor& x, int64_t bits, int64_t D,
                                    const at::Tensor& hm, int64_t npad) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "x: float32 (N, W) contiguous");
  const int64_t N = x.size(0), W = x.size(1);
  TORCH_CHECK(D > 0 && W % D == 0 && npad >= W && npad % 64 == 0, "head size must divide W");
  TORCH_CHECK(hm.numel() == 0 || (hm.dtype() == at::kFloat && hm.is_contiguous() &&
                                  hm.numel() == D * D), "rotation: empty or float32 (D, D)");
  auto packed = at::empty({N, npad * bits / 8}, x.options().dtype(at::kByte));
  auto sc = at::empty({N, W / D}, x.options());
  auto zr = at::empty({N, W / D}, x.options());
  auto deq = at::empty({N, W}, x.options());
  QUEPT_DISPATCH(bits, kv_quantize_rows, x.data_ptr<float>(), N, W, D,
                 hm.numel() ? hm.data_ptr<float>() : nullptr, npad, packed.data_ptr<uint8_t>(),
                 sc.data_ptr<float>(), zr.data_ptr<float>(), deq.data_ptr<float>());
  return {packed, sc, zr, deq};
}
at::Tensor kv_attend(const at::Tensor& qr, const at::Tensor& qn, const at::Tensor& kv,
                     const at::Tensor& nk, const at::Tensor& nv, const at::Tensor& mask,
                     const at::Tensor& hm) {
  TORCH_CHECK(qr.dim() == 4 && qr.dtype() == at::kFloat && qr.is_contiguous(),
              "qr: float32 (B, H, G, D) contiguous");
  const int64_t B = qr.size(0), H = qr.size(1), G = qr.size(2), D = qr.size(3);
  TORCH_CHECK(D % 8 == 0, "head size: a multiple of 8");
  TORCH_CHECK(qn.sizes() == qr.sizes() && qn.dtype() == at::kFloat && qn.is_contiguous(), "qn");
  TORCH_CHECK(kv.dtype() == at::kFloat && kv.is_contiguous() && kv.dim() == 2 &&
              kv.size(1) == 2 * H * D && kv.size(0) % B == 0,
              "kv: float32 (B * T, 2 H D) contiguous");
  const int64_t T = kv.size(0) / B;
  for (const at::Tensor* t : {&nk, &nv})
    TORCH_CHECK(t->dtype() == at::kFloat && t->is_contiguous() && t->numel() == B * H * D,
                "new key and value: float32 (B, H, 1, D) contiguous");
  TORCH_CHECK(mask.numel() == 0 || (mask.dtype() == at::kFloat && mask.is_contiguous() &&
                                    mask.numel() == B * (T + 1)),
              "mask: empty or additive float32 (B, T + 1)");
  TORCH_CHECK(hm.numel() == 0 || (hm.dtype() == at::kFloat && hm.is_contiguous() &&
                                  hm.numel() == D * D), "rotation: empty or float32 (D, D)");
  auto out = at::empty({B, H, G, D}, qr.options());
  kv_attend_rows(qr.data_ptr<float>(), qn.data_ptr<float>(), kv.data_ptr<float>(),
                 nk.data_ptr<float>(), nv.data_ptr<float>(),
                 mask.numel() ? mask.data_ptr<float>() : nullptr,
                 hm.numel() ? hm.data_ptr<float>() : nullptr, B, T, H, G, D,
                 out.data_ptr<float>());
  return out;
}
