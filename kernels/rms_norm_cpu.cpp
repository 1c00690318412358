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

#include <cmath>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

template <typename T>
void rms_norm_rows(const T* x, const T* weight, T* out, int64_t rows, int64_t D, float eps, bool is_gemma) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / D), [&](int64_t begin, int64_t end) {
    std::vector<float> row(D), w(D), y(D);  // x's row in fp32, the weight (1 + w for Gemma), the result
    at::vec::convert(weight, w.data(), D);
    if (is_gemma)
      for (auto& wd : w) wd += 1.f;
    for (int64_t r = begin; r < end; ++r) {
      const float* xr;
      if constexpr (std::is_same_v<T, float>) {
        xr = x + r * D;
      } else {
        at::vec::convert(x + r * D, row.data(), D);
        xr = row.data();
      }
      Vec squares(0.f);
      int64_t d = 0;
      for (; d + Vec::size() <= D; d += Vec::size()) squares = at::vec::fmadd(Vec::loadu(xr + d), Vec::loadu(xr + d), squares);
      float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, squares);
      for (; d < D; ++d) sum += xr[d] * xr[d];
      const float inv_rms = 1.f / std::sqrt(sum / D + eps);
      if (is_gemma) {
        at::vec::map2([inv_rms](Vec a, Vec b) { return (a * Vec(inv_rms)) * b; }, y.data(), xr, w.data(), D);
      } else {
        at::vec::map([inv_rms](Vec a) { return a * Vec(inv_rms); }, y.data(), xr, D);
        if constexpr (!std::is_same_v<T, float>) {  // rounded to the dtype before the weight
          at::vec::convert(y.data(), out + r * D, D);
          at::vec::convert(out + r * D, y.data(), D);
        }
        at::vec::map2([](Vec a, Vec b) { return a * b; }, y.data(), w.data(), y.data(), D);
      }
      at::vec::convert(y.data(), out + r * D, D);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool is_gemma) {
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "rms_norm: weight must be (", D, ",), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight and x must have one dtype");
  auto xc = x.contiguous(), wc = weight.contiguous();
  auto out = at::empty_like(xc);
  const int64_t rows = D ? xc.numel() / D : 0;
  AT_DISPATCH_V2(x.scalar_type(), "rms_norm", AT_WRAP([&] {
    rms_norm_rows(xc.data_ptr<scalar_t>(), wc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, D, eps, is_gemma);
  }), at::kFloat, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(darl_infer_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool is_gemma) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
}
