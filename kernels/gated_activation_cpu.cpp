// The gated MLP's middle, act(gate) * up, on the CPU: kernels/gated_activation.py's math (its
// Triton kernel's: the tanh GELU in its exp form, in fp32; the activation rounded to the dtype, then
// the product), fp32 or bf16, built by kernels/cpu_extension.py. gate and up are read once each (the
// halves of one gate/up matmul's output) and the result written once: with PyTorch's ops the
// activation and the product are two passes, and torch's tanh (SLEEF's, to 1 ulp) most of their time.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "cpu_vec.h"

namespace {

using darl_vec::load_fp32;
using darl_vec::rounded;
using darl_vec::store_rounded;
using darl_vec::Vec;

template <typename T>
void gated_rows(const T* gate, int64_t gate_stride, const T* up, int64_t up_stride, T* out, int64_t rows, int64_t I, bool gelu_tanh) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(I, 1)), [&](int64_t begin, int64_t end) {
    const Vec one(1.f), c(0.7978845608028654f), c3(0.044715f), minus_two(-2.f);
    for (int64_t r = begin; r < end; ++r) {
      const T *g = gate + r * gate_stride, *u = up + r * up_stride;
      for (int64_t i = 0; i < I; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), I - i);
        const Vec x = load_fp32(g + i, n);
        // gelu_tanh: x * 0.5 (1 + tanh(z)) = x / (1 + exp(-2z)), z = sqrt(2/pi) (x + 0.044715 x^3);
        // silu: x / (1 + exp(-x))
        const Vec e = gelu_tanh ? (minus_two * (c * (x + c3 * x * x * x))).exp_u20() : x.neg().exp_u20();
        store_rounded(rounded<T>(x / (one + e)) * load_fp32(u + i, n), out + r * I + i, n);
      }
    }
  });
}

// gate, up (rows, I) with a unit stride along I; the result (rows, I) contiguous
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, bool gelu_tanh) {
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes(), "gated_activation: gate and up must be (rows, I) alike, got ",
              gate.sizes(), " and ", up.sizes());
  TORCH_CHECK(up.scalar_type() == gate.scalar_type(), "gated_activation: gate and up must share one dtype");
  auto g = gate.stride(1) == 1 ? gate : gate.contiguous(), u = up.stride(1) == 1 ? up : up.contiguous();
  auto out = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_V2(gate.scalar_type(), "gated_activation", AT_WRAP([&] {
    gated_rows(g.data_ptr<scalar_t>(), g.stride(0), u.data_ptr<scalar_t>(), u.stride(0), out.data_ptr<scalar_t>(), gate.size(0),
               gate.size(1), gelu_tanh);
  }), at::kFloat, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(darl_infer_cpu, m) {
  m.def("gated_activation(Tensor gate, Tensor up, bool gelu_tanh) -> Tensor");
  m.impl("gated_activation", c10::DispatchKey::CPU, &gated_activation);
}
