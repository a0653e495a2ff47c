// Fused CPU kernel for the weight fake quantization of calibration (fq_forward, fq_backward).
// Built on first use by quept.ops.fq_kernel.load() through torch.utils.cpp_extension.load_inline
// (extension quept_fake_quant_*), which adds the Python bindings: this file has no
// PYBIND11_MODULE of its own.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>

// Bit-equal to PyTorch's elementwise float32 operations: no fused multiply-adds.
#pragma GCC optimize("fp-contract=off")

namespace {
// The per-group values the backward needs, rows of `stats`.
enum Stat { kMax, kMin, kLo, kRaw, kScale, kV, kZero, kStats };
}

// w (R, gs) float32, one group per row; hi_f, lo_f (R). Returns out (R, gs) and stats (7, R).
std::vector<torch::Tensor> fq_forward(torch::Tensor w, torch::Tensor hi_f, torch::Tensor lo_f,
                                      int64_t qmax) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.scalar_type() == torch::kFloat32,
              "fq_forward: w must be a contiguous float32 (groups, group size) tensor");
  const int64_t R = w.size(0), gs = w.size(1);
  TORCH_CHECK(hi_f.numel() == R && lo_f.numel() == R, "fq_forward: one clip factor per group");
  auto out = torch::empty_like(w);
  auto stats = torch::empty({kStats, R}, w.options());
  const float* W = w.data_ptr<float>();
  const float* A = hi_f.data_ptr<float>();
  const float* B = lo_f.data_ptr<float>();
  float* O = out.data_ptr<float>();
  float* S = stats.data_ptr<float>();
  const float fq = static_cast<float>(qmax);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* x = W + r * gs;
      float mx = x[0], mn = x[0];
      for (int64_t i = 1; i < gs; ++i) {
        mx = std::max(mx, x[i]);
        mn = std::min(mn, x[i]);
      }
      const float hi = A[r] * mx, lo = B[r] * mn;
      const float raw = (hi - lo) / fq;
      const float s = raw < 1e-8f ? 1e-8f : raw;
      const float v = std::nearbyint(-lo / s);
      const float z = std::min(std::max(v, 0.0f), fq);
      float* o = O + r * gs;
      for (int64_t i = 0; i < gs; ++i) {
        const float t = std::nearbyint(x[i] / s) + z;
        o[i] = (std::min(std::max(t, 0.0f), fq) - z) * s;
      }
      const float st[kStats] = {mx, mn, lo, raw, s, v, z};
      for (int k = 0; k < kStats; ++k) S[k * R + r] = st[k];
    }
  });
  return {out, stats};
}

// Gradients of fq_forward's output w.r.t. w, hi_f and lo_f, given its gradient g (R, gs).
std::vector<torch::Tensor> fq_backward(torch::Tensor g, torch::Tensor w, torch::Tensor hi_f,
                                       torch::Tensor lo_f, torch::Tensor stats, int64_t qmax) {
  TORCH_CHECK(g.sizes() == w.sizes() && g.is_contiguous() && g.scalar_type() == torch::kFloat32,
              "fq_backward: g must be a contiguous float32 tensor shaped like w");
  const int64_t R = w.size(0), gs = w.size(1);
  auto gw = torch::empty_like(w);
  auto ga = torch::empty({R}, w.options()), gb = torch::empty({R}, w.options());
  const float* G = g.data_ptr<float>();
  const float* W = w.data_ptr<float>();
  const float* A = hi_f.data_ptr<float>();
  const float* B = lo_f.data_ptr<float>();
  const float* S = stats.data_ptr<float>();
  float* GW = gw.data_ptr<float>();
  float* GA = ga.data_ptr<float>();
  float* GB = gb.data_ptr<float>();
  const float fq = static_cast<float>(qmax);
  at::parallel_for(0, R, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float mx = S[kMax * R + r], mn = S[kMin * R + r], lo = S[kLo * R + r];
      const float raw = S[kRaw * R + r], s = S[kScale * R + r], v = S[kV * R + r];
      const float z = S[kZero * R + r];
      const float* x = W + r * gs;
      const float* gr = G + r * gs;
      float* o = GW + r * gs;
      double sum_g = 0, sum_in = 0, sum_ds = 0;  // sums of g, of g inside the clamp, g ds/ds
      int64_t n_max = 0, n_min = 0;
      for (int64_t i = 0; i < gs; ++i) {
        const float u = x[i] / s;
        const float t = std::nearbyint(u) + z;
        const float q = std::min(std::max(t, 0.0f), fq);
        const float gi = gr[i];
        sum_g += gi;
        if (t == q) {  // inside the clamp: out = (round(u) + z - z) s with u = w / s
          sum_in += gi;
          sum_ds += static_cast<double>(gi) * ((q - z) - u);
          o[i] = gi;
        } else {
          sum_ds += static_cast<double>(gi) * (q - z);
          o[i] = 0.0f;
        }
        n_max += x[i] == mx;
        n_min += x[i] == mn;
      }
      const float g_zero = static_cast<float>(sum_in - sum_g) * s;
      const float g_v = (v >= 0.0f && v <= fq) ? g_zero : 0.0f;  // z = clamp(v), v = -lo / s
      const float g_scale = static_cast<float>(sum_ds) + g_v * lo / (s * s);
      const float g_raw = raw >= 1e-8f ? g_scale : 0.0f;  // s = clamp(raw, 1e-8)
      const float g_hi = g_raw / fq, g_lo = -g_v / s - g_raw / fq;
      GA[r] = g_hi * mx;
      GB[r] = g_lo * mn;
      const float to_max = g_hi * A[r] / n_max, to_min = g_lo * B[r] / n_min;
      for (int64_t i = 0; i < gs; ++i) {
        if (x[i] == mx) o[i] += to_max;
        if (x[i] == mn) o[i] += to_min;
      }
    }
  });
  return {gw, ga, gb};
}
