// Shared-prefix attention on the CPU: kernels/shared_prefix_attention.py's op (its reference's math,
// the items packed without padding, each attending to the one prefix copy and its own causal keys),
// fp32 or bf16, built by kernels/cpu_extension.py where PyTorch links MKL (x86).
//
// The items are taken in blocks of whole items with about BLOCK_ROWS (token, query head) rows (an
// item longer than that in slices of its own); with the G query heads of a KV head folded into the
// rows (adjacent in memory for one token), one block and KV head is four matmuls, fp32 accumulation
// (MKL, single-threaded inside the parallel loop):
//   S = Q [prefix K; the block's own K]^T   (two matmuls: one per K source, no copy of either)
//   P = softmax(scale S) over the visible keys: the prefix (inside the sliding window) and the row's
//       own item's keys up to itself; the block's other items' keys get 0
//   O = P [prefix V; the block's own V]     (two matmuls)
// so each item reads the prefix K/V in place (no per-item copy, no padding, no gather of q or of
// the output), and the own-key part is one matmul per block instead of one per item (it computes
// the block's other items too: ~G * BLOCK_ROWS / G keys wide instead of one item's, cheap next to
// the prefix part). In bf16, P is rounded to bf16 for the second matmul, as PyTorch's CPU flash
// attention does.
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

// MKL, linked into libtorch_cpu on x86 (ATen's own gemm wrappers are not exported); column-major
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                                       float* c, int ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
// the op alone, 100 items of the default model, 2-core AMX Xeon: fp32 3.7-4.0 ms a layer at 64
// rows, 4.4 at 128, 4.8-5.2 at 256 (fewer of a block's other items' keys computed and masked); bf16 alike
constexpr int64_t BLOCK_ROWS = 64;

// Row-major C (m x n, ldc) = A (m x k) B^T or A B, B (n x k) or (k x n): as column-major BLAS,
// C^T = op(B) A^T.
void matmul(bool b_transposed, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
            int64_t ldb, float beta, float* c, int64_t ldc) {
  const char tb = b_transposed ? 'T' : 'N', ta = 'N';
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  const float one = 1.f;
  sgemm_(&tb, &ta, &in, &im, &ik, &one, b, &ildb, a, &ilda, &beta, c, &ildc);
}
void matmul(bool b_transposed, int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda,
            const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  constexpr int col_major = 102, no_trans = 111, trans = 112;
  cblas_gemm_bf16bf16f32(col_major, b_transposed ? trans : no_trans, no_trans, n, m, k, 1.f,
                         reinterpret_cast<const uint16_t*>(b), ldb, reinterpret_cast<const uint16_t*>(a), lda,
                         beta, c, ldc);
}

// The loops below run whole vectors, the last one partial (an item's own keys are often fewer
// than a vector: one key at a time through std::exp was most of the op's time).
float range_max(const float* s, int64_t a, int64_t b, float top) {
  const Vec lowest(-std::numeric_limits<float>::infinity());
  Vec m = lowest;
  for (int64_t j = a; j < b; j += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), b - j);
    m = at::vec::maximum(m, Vec::set(lowest, Vec::loadu(s + j, n), n));
  }
  float lanes[Vec::size()];
  m.store(lanes);
  for (float x : lanes) top = std::max(top, x);
  return top;
}

// s[j] = exp(scale * s[j] - shift) over [a, b); returns their sum
float exp_range(float* s, int64_t a, int64_t b, float scale, float shift) {
  Vec sum(0.f);
  for (int64_t j = a; j < b; j += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), b - j);
    const Vec e = (Vec::loadu(s + j, n) * Vec(scale) - Vec(shift)).exp_u20();
    e.store(s + j, n);
    sum = sum + Vec::set(Vec(0.f), e, n);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
}

// out[j] = s[j] * factor over [a, b), in out's dtype
template <typename T>
void scale_range(const float* s, T* out, int64_t a, int64_t b, float factor) {
  for (int64_t j = a; j < b; j += Vec::size()) {
    const int64_t n = std::min<int64_t>(Vec::size(), b - j);
    const Vec x = Vec::loadu(s + j, n) * Vec(factor);
    if constexpr (std::is_same_v<T, float>) {
      x.store(out + j, n);
    } else {
      at::vec::convert_from_float<T>(x, x).store(out + j, n);  // the first n of the low half
    }
  }
}

// One row of n scores: out = softmax(scale * s) over the visible keys [a0, a1) and [b0, b1)
// (a1 <= b0; at least one key), 0 elsewhere; s is overwritten (out may be s).
template <typename T>
void softmax_row(float* s, T* out, int64_t n, int64_t a0, int64_t a1, int64_t b0, int64_t b1, float scale) {
  const float top = range_max(s, b0, b1, range_max(s, a0, a1, -std::numeric_limits<float>::infinity()));
  const float shift = top * scale;
  const float inv = 1.f / (exp_range(s, a0, a1, scale, shift) + exp_range(s, b0, b1, scale, shift));
  scale_range(s, out, a0, a1, inv);
  scale_range(s, out, b0, b1, inv);
  std::fill(out, out + a0, T(0));
  std::fill(out + a1, out + b0, T(0));
  std::fill(out + b1, out + n, T(0));
}

// Query tokens t0 .. t1 - 1 of items first .. last - 1, their own keys from key0 on: a run of whole
// items (key0 = t0), or a slice of one long item (key0 = the item's start), so that a block's
// scores stay ~BLOCK_ROWS rows of (prefix + own keys) whatever the items' lengths.
struct Block {
  int64_t t0, t1, key0, first, last;
};

std::vector<Block> blocks_of(const int64_t* cu, int64_t N, int64_t G) {
  std::vector<Block> blocks;
  const int64_t slice = std::max<int64_t>(1, BLOCK_ROWS / G);  // tokens of a long item's slice
  int64_t run = 0;                                              // the first item of the open run
  for (int64_t n = 0; n < N; ++n) {
    if ((cu[n + 1] - cu[n]) * G > BLOCK_ROWS) {  // a long item: close the run, then its slices
      if (run < n) blocks.push_back({cu[run], cu[n], cu[run], run, n});
      for (int64_t t = cu[n]; t < cu[n + 1]; t += slice) blocks.push_back({t, std::min(t + slice, cu[n + 1]), cu[n], n, n + 1});
      run = n + 1;
    } else if ((cu[n + 1] - cu[run]) * G >= BLOCK_ROWS || n == N - 1) {
      blocks.push_back({cu[run], cu[n + 1], cu[run], run, n + 1});
      run = n + 1;
    }
  }
  return blocks;
}

template <typename T>
void attend(const T* q, int64_t q_token_stride, int64_t q_head_stride, const T* k, const T* v, const T* prefix_k,
            const T* prefix_v, const int64_t* cu, int64_t N, int64_t P, int64_t H, int64_t Hkv, int64_t D, float scale,
            int64_t window, T* out) {
  const int64_t G = H / Hkv, ld_kv = Hkv * D;  // k, v and the prefix's rows: (token, KV head, D)
  const auto blocks = blocks_of(cu, N, G);
  int64_t tokens = 0, keys = 0;  // the most query tokens and own keys of a block
  for (const auto& b : blocks) tokens = std::max(tokens, b.t1 - b.t0), keys = std::max(keys, b.t1 - b.key0);
  const int64_t ld_s = P + keys;
  // a block's query rows, (token, head of the group), are one matrix of stride D in q itself when q
  // is (T, H, D) contiguous with one KV head; else (HF hands q over in its (H, T, D) memory) they
  // are copied into one, a block at a time, while it is small enough to stay in cache
  const bool rows_in_place = Hkv == 1 && q_head_stride == D && q_token_stride == H * D;
  at::parallel_for(0, blocks.size() * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(tokens * G * ld_s), O(tokens * G * D);
    std::vector<T> rows_q(rows_in_place ? 0 : tokens * G * D), probs(std::is_same_v<T, float> ? 0 : tokens * G * ld_s);
    for (int64_t task = begin; task < end; ++task) {
      const Block& b = blocks[task / Hkv];
      const int64_t h = task % Hkv, M = (b.t1 - b.t0) * G, own_keys = b.t1 - b.key0, width = P + own_keys;
      if (M == 0) continue;  // a run of empty items
      const T* Q = q + b.t0 * H * D;
      if (!rows_in_place) {
        for (int64_t t = b.t0; t < b.t1; ++t)
          for (int64_t g = 0; g < G; ++g)
            std::copy_n(q + t * q_token_stride + (h * G + g) * q_head_stride, D, rows_q.data() + ((t - b.t0) * G + g) * D);
        Q = rows_q.data();
      }
      if (P) matmul(true, M, P, D, Q, D, prefix_k + h * D, ld_kv, 0.f, S.data(), ld_s);
      matmul(true, M, own_keys, D, Q, D, k + b.key0 * ld_kv + h * D, ld_kv, 0.f, S.data() + P, ld_s);
      for (int64_t n = b.first; n < b.last; ++n) {
        const int64_t own = cu[n] - b.key0;  // the item's first key among the block's own keys
        for (int64_t token = std::max(cu[n], b.t0); token < std::min(cu[n + 1], b.t1); ++token) {
          const int64_t t = token - cu[n];  // the token within its item, at position P + t
          // keys at positions <= P + t - window are outside the window
          const int64_t lo = window > 0 ? std::max<int64_t>(0, P + t - window + 1) : 0;
          for (int64_t r = (token - b.t0) * G; r < (token - b.t0 + 1) * G; ++r) {
            float* s = S.data() + r * ld_s;
            T* p = std::is_same_v<T, float> ? reinterpret_cast<T*>(s) : probs.data() + r * ld_s;
            softmax_row(s, p, width, std::min(lo, P), P, P + own + std::max<int64_t>(0, lo - P), P + own + t + 1, scale);
          }
        }
      }
      const T* Pr;
      if constexpr (std::is_same_v<T, float>) Pr = S.data(); else Pr = probs.data();
      if (P) matmul(false, M, D, P, Pr, ld_s, prefix_v + h * D, ld_kv, 0.f, O.data(), D);
      matmul(false, M, D, own_keys, Pr + P, ld_s, v + b.key0 * ld_kv + h * D, ld_kv, P ? 1.f : 0.f, O.data(), D);
      for (int64_t t = b.t0; t < b.t1; ++t) at::vec::convert(O.data() + (t - b.t0) * G * D, out + (t * H + h * G) * D, G * D);
    }
  });
}

at::Tensor shared_prefix_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                   const at::Tensor& cu_seqlens, double scale, int64_t sliding_window) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3 && prefix_k.dim() == 3 && prefix_v.dim() == 3,
              "shared_prefix_attention: q, k, v, prefix_k, prefix_v must be (tokens, heads, head dim)");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), Hkv = k.size(1), P = prefix_k.size(0);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && k.size(0) == T && v.sizes() == k.sizes() && k.size(2) == D &&
                  prefix_k.size(1) == Hkv && prefix_k.size(2) == D && prefix_v.sizes() == prefix_k.sizes(),
              "shared_prefix_attention: shapes do not match");
  for (const auto& x : {k, v, prefix_k, prefix_v})
    TORCH_CHECK(x.scalar_type() == q.scalar_type(), "shared_prefix_attention: one dtype for all inputs");
  auto cu = cu_seqlens.to(at::kLong).contiguous();
  const int64_t N = cu.numel() - 1;
  TORCH_CHECK(N >= 0 && cu.data_ptr<int64_t>()[N] == T, "shared_prefix_attention: cu_seqlens must end at q's tokens");
  // q as it comes (rows of D contiguous values), the rest contiguous
  auto qc = q.stride(2) == 1 ? q : q.contiguous();
  auto kc = k.contiguous(), vc = v.contiguous(), pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  auto out = at::empty({T, H, D}, q.options());
  if (N == 0 || T == 0) return out;
  AT_DISPATCH_V2(q.scalar_type(), "shared_prefix_attention", AT_WRAP([&] {
    attend(qc.data_ptr<scalar_t>(), qc.stride(0), qc.stride(1), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
           pk.data_ptr<scalar_t>(), pv.data_ptr<scalar_t>(), cu.data_ptr<int64_t>(), N, P, H, Hkv, D, scale, sliding_window,
           out.data_ptr<scalar_t>());
  }), at::kFloat, at::kBFloat16);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(darl_infer_cpu, m) {
  m.def("shared_prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor cu_seqlens, "
        "float scale, int sliding_window) -> Tensor");
  m.impl("shared_prefix_attention", c10::DispatchKey::CPU, &shared_prefix_attention);
}
