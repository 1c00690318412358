// RMSNorm on the CPU, one pass over each row: kernels/rms_norm.py's math (`rms_norm_reference`,
// Hugging Face's modules) with its rounding, fp32 or bf16, built by kernels/cpu_extension.py.
//   "llama": w * (x * rsqrt(mean(x^2) + eps)).to(dtype)          (is_gemma false)
//   "gemma": ((x * rsqrt(mean(x^2) + eps)) * (1 + w)).to(dtype)  (is_gemma true, in fp32)
// As PyTorch ops a norm is ~8 passes over the tensor (upcast, square, mean, add, rsqrt, two products,
// downcast); here a row is read once, normalised in fp32 while in cache and written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace {

using darl_vec::load_fp32;
using darl_vec::rounded;
using darl_vec::store_rounded;
using darl_vec::sum_of_squares;
using darl_vec::Vec;

// values x of a row normalised by inv_rms, before the result's rounding to T: "gemma" (x * inv_rms)
// * (1 + w), in fp32; "llama" w * (x * inv_rms rounded to T). w holds 1 + w for Gemma.
template <typename T>
Vec normed(const Vec& x, const Vec& inv_rms, const Vec& w, bool is_gemma) {
  return is_gemma ? (x * inv_rms) * w : rounded<T>(x * inv_rms) * w;
}

// the weight in fp32 (1 + w for Gemma). Each thread of a kernel takes its own copy of it:
// one copy shared by both threads ran the norm 40 % slower.
std::vector<float> weight_fp32(const at::Tensor& weight, bool is_gemma) {
  std::vector<float> w(weight.numel());
  AT_DISPATCH_V2(weight.scalar_type(), "weight_fp32", AT_WRAP([&] {
    at::vec::convert(weight.data_ptr<scalar_t>(), w.data(), w.size());
  }), at::kFloat, at::kBFloat16);
  if (is_gemma)
    for (auto& wd : w) wd += 1.f;
  return w;
}

template <typename T>
void rms_norm_rows(const T* x, const std::vector<float>& weight, T* out, int64_t rows, int64_t D, float eps, bool is_gemma) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    const std::vector<float> w(weight);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * D;
      const Vec inv_rms(1.f / std::sqrt(sum_of_squares(xr, D) / D + eps));
      for (int64_t d = 0; d < D; d += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), D - d);
        store_rounded(normed<T>(load_fp32(xr + d, n), inv_rms, Vec::loadu(&w[d], n), is_gemma), out + r * D + d, n);
      }
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool is_gemma) {
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "rms_norm: weight must be (", D, ",), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x must have one dtype");
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t rows = D ? xc.numel() / D : 0;
  AT_DISPATCH_V2(x.scalar_type(), "rms_norm", AT_WRAP([&] {
    rms_norm_rows(xc.data_ptr<scalar_t>(), weight_fp32(weight, is_gemma), out.data_ptr<scalar_t>(), rows, D, eps, is_gemma);
  }), at::kFloat, at::kBFloat16);
  return out;
}

// Per row: sum = residual + norm(x; x_weight) (x itself for no x_weight), rounded to T; then
// normed = norm(sum; weight) (skipped for no weight, out null). Three passes over a row in cache.
template <typename T>
void add_rms_norm_rows(const T* x, const T* residual, const std::vector<float>& x_weight, const std::vector<float>& weight, T* sum,
                       T* out, int64_t rows, int64_t D, float eps, bool is_gemma) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    const std::vector<float> xw(x_weight), w(weight);
    std::vector<float> added(D);  // the row's sum, rounded to T, in fp32
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * D;
      const Vec inv_rms(xw.empty() ? 1.f : 1.f / std::sqrt(sum_of_squares(xr, D) / D + eps));
      for (int64_t d = 0; d < D; d += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), D - d);
        Vec y = load_fp32(xr + d, n);
        if (!xw.empty()) y = rounded<T>(normed<T>(y, inv_rms, Vec::loadu(&xw[d], n), is_gemma));
        const Vec s = rounded<T>(load_fp32(residual + r * D + d, n) + y);
        store_rounded(s, sum + r * D + d, n);
        s.store(&added[d], n);
      }
      if (!out) continue;
      const Vec inv_rms_sum(1.f / std::sqrt(sum_of_squares(added.data(), D) / D + eps));
      for (int64_t d = 0; d < D; d += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), D - d);
        store_rounded(normed<T>(Vec::loadu(&added[d], n), inv_rms_sum, Vec::loadu(&w[d], n), is_gemma), out + r * D + d, n);
      }
    }
  });
}

// A decoder layer's residual add between its norms, one pass over the rows instead of three:
//   sum = residual + norm(x; x_weight)   (x itself where x_weight is empty), rounded to the dtype
//   normed = norm(sum; weight)           (empty where weight is empty)
// each step rounded as HF's modules and PyTorch's add round.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& x_weight,
                                                const at::Tensor& weight, double eps, bool is_gemma) {
  const int64_t D = x.size(-1);
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm: x ", x.sizes(), " and residual ", residual.sizes(), " differ");
  TORCH_CHECK(residual.scalar_type() == x.scalar_type(), "add_rms_norm: x and residual must have one dtype");
  for (const auto& w : {x_weight, weight}) {
    TORCH_CHECK(w.numel() == 0 || (w.dim() == 1 && w.size(0) == D), "add_rms_norm: a weight must be (", D, ",) or empty, got ", w.sizes());
    TORCH_CHECK(w.numel() == 0 || w.scalar_type() == x.scalar_type(), "add_rms_norm: the weights must be in x's dtype");
  }
  auto xc = x.contiguous(), rc = residual.contiguous();
  auto sum = at::empty_like(xc);
  auto out = weight.numel() ? at::empty_like(xc) : at::empty({0}, x.options());
  const int64_t rows = D ? xc.numel() / D : 0;
  AT_DISPATCH_V2(x.scalar_type(), "add_rms_norm", AT_WRAP([&] {
    add_rms_norm_rows(xc.data_ptr<scalar_t>(), rc.data_ptr<scalar_t>(), weight_fp32(x_weight, is_gemma), weight_fp32(weight, is_gemma),
                      sum.data_ptr<scalar_t>(), weight.numel() ? out.data_ptr<scalar_t>() : nullptr, rows, D, eps, is_gemma);
  }), at::kFloat, at::kBFloat16);
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(darl_infer_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool is_gemma) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor x_weight, Tensor weight, float eps, bool is_gemma) -> (Tensor, Tensor)");
  m.impl("add_rms_norm", c10::DispatchKey::CPU, &add_rms_norm);
}
