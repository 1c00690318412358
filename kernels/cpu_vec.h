// fp32 vectors loaded from and stored to the C++ kernels' dtypes (fp32, bf16), rounded as PyTorch
// rounds (to nearest even). With AVX-512 a bf16 vector is converted in registers (masked loads and
// stores for a partial one); with AVX-512-BF16 (kernels/cpu_extension.py adds -mavx512bf16 where the
// CPU has it) the rounding is one instruction instead of ATen's ~10 integer ops, which made it most
// of the rotary kernel's time. That instruction flushes fp32 subnormals (|x| < 1.2e-38) to zero,
// where PyTorch keeps them as bf16 subnormals: the only values on which the two differ.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <type_traits>

namespace darl_vec {

using Vec = at::vec::Vectorized<float>;

#if defined(CPU_CAPABILITY_AVX512)
inline __mmask16 first(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }

inline Vec widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }

inline __m256i narrow(const Vec& v) {
#if defined(__AVX512BF16__)
  return (__m256i)_mm512_cvtneps_pbh(v);
#else
  return at::vec::cvtfp32_bf16(__m512(v));
#endif
}
#endif

// n <= Vec::size() values from p as fp32 (the rest of the vector 0)
template <typename T>
inline Vec load_fp32(const T* p, int64_t n = Vec::size()) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    return widen(n == Vec::size() ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)) : _mm256_maskz_loadu_epi16(first(n), p));
#else
    float values[Vec::size()] = {};
    at::vec::convert(p, values, n);
    return Vec::loadu(values);
#endif
  }
}

// the first n values of v to p, rounded to T
template <typename T>
inline void store_rounded(const Vec& v, T* p, int64_t n = Vec::size()) {
  if constexpr (std::is_same_v<T, float>) {
    v.store(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if (n == Vec::size()) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v));
    else _mm256_mask_storeu_epi16(p, first(n), narrow(v));
#else
    float values[Vec::size()];
    v.store(values);
    at::vec::convert(values, p, n);
#endif
  }
}

// v rounded to T and back to fp32, as a PyTorch op's result in T then read in fp32
template <typename T>
inline Vec rounded(const Vec& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    return widen(narrow(v));
#else
    return std::get<0>(at::vec::convert_bfloat16_float(at::vec::convert_float_bfloat16(v, v)));
#endif
  }
}

// the sum of a row's squares in fp32, summed in one order by every kernel (the norms' and the
// rotary's): fp32 within 2e-6 of PyTorch's mean, which sums in another
template <typename T>
inline float sum_of_squares(const T* x, int64_t D) {
  Vec squares(0.f);
  int64_t d = 0;
  for (; d + Vec::size() <= D; d += Vec::size()) {
    const Vec v = load_fp32(x + d);
    squares = at::vec::fmadd(v, v, squares);
  }
  float sum = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, squares);
  for (; d < D; ++d) sum += static_cast<float>(x[d]) * static_cast<float>(x[d]);
  return sum;
}

}  // namespace darl_vec
