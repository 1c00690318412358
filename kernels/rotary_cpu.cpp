// Rotary embedding of queries or keys, with the per-head RMSNorm before it (Qwen3, Gemma-3), on the
// CPU: kernels/rotary.py's math (`rotary_reference`, Hugging Face's modules) with its rounding, fp32
// or bf16, built by kernels/cpu_extension.py. Each (token, head) row is read once, normalised and
// rotated in fp32 while in cache, each step rounded to the dtype where the reference rounds, and
// written once, (T, H, D) contiguous: as PyTorch ops the pair is ~14 passes (two products, two
// slices, a negation, a concatenation, a sum, and the norm's ~8).
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <cmath>
#include <vector>

namespace {

using darl_vec::Vec;
using darl_vec::load_fp32;
using darl_vec::rounded;
using darl_vec::store_rounded;
enum Norm { kNone = 0, kLlama = 1, kGemma = 2 };

template <typename T>
void rotary_rows(const T* x, int64_t token_stride, int64_t head_stride, const T* cos, int64_t cos_stride, const T* sin,
                 int64_t sin_stride, const T* weight, T* out, int64_t tokens, int64_t H, int64_t D, float eps, Norm norm) {
  const int64_t half = D / 2;
  at::parallel_for(0, tokens * H, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    std::vector<float> w(norm == kNone ? 0 : D);  // the norm's weight in fp32 (1 + w for Gemma)
    if (norm != kNone) {
      at::vec::convert(weight, w.data(), D);
      if (norm == kGemma)
        for (auto& wd : w) wd += 1.f;
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = r / H, h = r % H;
      const T* xr = x + t * token_stride + h * head_stride;
      const T* c = cos + t * cos_stride;
      const T* s = sin + t * sin_stride;
      const Vec inv_rms(norm == kNone ? 1.f : 1.f / std::sqrt(darl_vec::sum_of_squares(xr, D) / D + eps));
      // x[d, d + n) normalised: "gemma" ((x * inv_rms) * (1 + w)), rounded; "llama" w * (x * inv_rms
      // rounded), rounded
      const auto normed = [&](int64_t d, int64_t n) {
        const Vec xd = load_fp32(xr + d, n);
        if (norm == kNone) return xd;
        const Vec wd = Vec::loadu(&w[d], n);
        return norm == kGemma ? rounded<T>((xd * inv_rms) * wd) : rounded<T>(wd * rounded<T>(xd * inv_rms));
      };
      // rotate_half(x) = (-x2, x1); each product rounded before the sum, as PyTorch's ops round
      for (int64_t d = 0; d < half; d += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), half - d);
        const Vec x1 = normed(d, n), x2 = normed(half + d, n);
        store_rounded(rounded<T>(rounded<T>(x1 * load_fp32(c + d, n)) + rounded<T>(x2.neg() * load_fp32(s + d, n))), out + r * D + d, n);
        store_rounded(rounded<T>(rounded<T>(x2 * load_fp32(c + half + d, n)) + rounded<T>(x1 * load_fp32(s + half + d, n))), out + r * D + half + d, n);
      }
    }
  });
}

// x (T, H, D), any strides with a unit one along D; cos, sin (T, D); weight (D,) or empty: no norm
at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& weight, double eps, int64_t norm) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "rotary: x must be (T, H, D) with D even, got ", x.sizes());
  const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rotary: cos and sin must be (", T, ", ", D, "), got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(norm == kNone || (weight.dim() == 1 && weight.size(0) == D), "rotary: the norm's weight must be (", D, ",)");
  TORCH_CHECK(norm >= kNone && norm <= kGemma, "rotary: unknown norm ", norm);
  for (const auto& t : {cos, sin})
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rotary: x, cos and sin must share one dtype");
  TORCH_CHECK(norm == kNone || weight.scalar_type() == x.scalar_type(), "rotary: the norm's weight must be in x's dtype");
  auto xs = x.stride(2) == 1 ? x : x.contiguous();
  auto cs = cos.stride(1) == 1 ? cos : cos.contiguous(), ss = sin.stride(1) == 1 ? sin : sin.contiguous();
  auto wc = weight.contiguous();
  auto out = at::empty({T, H, D}, x.options());
  AT_DISPATCH_V2(x.scalar_type(), "rotary", AT_WRAP([&] {
    rotary_rows(xs.data_ptr<scalar_t>(), xs.stride(0), xs.stride(1), cs.data_ptr<scalar_t>(), cs.stride(0),
                ss.data_ptr<scalar_t>(), ss.stride(0), norm == kNone ? nullptr : wc.data_ptr<scalar_t>(),
                out.data_ptr<scalar_t>(), T, H, D, eps, static_cast<Norm>(norm));
  }), at::kFloat, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(darl_infer_cpu, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, Tensor weight, float eps, int norm) -> Tensor");
  m.impl("rotary", c10::DispatchKey::CPU, &rotary);
}
