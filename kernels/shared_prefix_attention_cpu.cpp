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

#include "cpu_vec.h"

#include <cmath>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <vector>
#if defined(DARL_AMX)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

#if defined(DARL_AMX)
// bf16 on a CPU with AMX (kernels/cpu_extension.py defines DARL_AMX where the CPU has it): the same
// blocks and softmax, the four matmuls as AMX tile products instead of MKL calls (at a block's ~64
// rows and ~100 keys MKL's bf16 gemm ran at ~1/10 of the AMX peak: its per-call packing and setup).
// A tile is 16 rows of 64 bytes; B operands are packed as AMX wants them (pairs of bf16 along the
// reduced dimension): the prefix's K and V once per call, a block's own K and V per block.
namespace amx {

using bf16 = at::BFloat16;
constexpr int64_t R = 16;          // rows of a tile, and fp32 columns of a result tile
constexpr int64_t KW = 32;         // bf16 values in a tile row
constexpr int64_t TILE = R * KW;   // bf16 values in a packed tile

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned, as tile rows are best read: one cache line each
template <typename T>
struct Buffer {
  explicit Buffer(int64_t n) : data(static_cast<T*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * sizeof(T), 64)))) {}
  Buffer(const Buffer&) = delete;
  ~Buffer() { std::free(data); }
  T* data;
};

// AMX and Linux's permission to use its registers (asked once per process), unless DARL_INFER_AMX=0
// (read at each call: bench/cpu_kernels.py compares the two paths in one process)
bool ready() {
  static const bool permitted = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return __builtin_cpu_supports("amx-bf16") && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  const char* setting = std::getenv("DARL_INFER_AMX");
  return permitted && !(setting && std::string_view(setting) == "0");
}

// tiles 0-3: results (16 x 16 fp32); 4: A (16 x 32 bf16); 6, 7: B (16 x 16 pairs of bf16)
void configure() {
  struct alignas(64) Config {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) config.colsb[t] = 64, config.rows[t] = R;
  _tile_loadconfig(&config);
}

// 16 rows of 16 32-bit words, transposed in registers: r[i] becomes column i
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Keys [0, count) (rows of stride ld) as the B of S = Q K^T: `tiles` tiles of 16 keys (keys past
// count 0) by D / 32 steps, tile (j, step) row i = for each key, its values 32 step + 2i and + 1:
// a pair of bf16 values is one 32-bit word, and a tile the transpose of 16 keys' 16 words
void pack_keys(const bf16* k, int64_t ld, int64_t count, int64_t tiles, int64_t D, bf16* out) {
  const int64_t steps = D / KW;
  __m512i r[R];
  for (int64_t j = 0; j < tiles; ++j)
    for (int64_t step = 0; step < steps; ++step) {
      for (int64_t n = 0; n < R; ++n)
        r[n] = j * R + n < count ? _mm512_loadu_si512(k + (j * R + n) * ld + step * KW) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t i = 0; i < R; ++i) _mm512_storeu_si512(out + ((j * steps + step) * R + i) * KW, r[i]);
    }
}

// Values [0, count) (rows of stride ld) as the B of O = P V: `steps` steps of 32 keys (keys past
// count 0) by D / 16 tiles, tile (step, e) row i = for each of the values 16e .. 16e + 15, keys
// 32 step + 2i and + 1
void pack_values(const bf16* v, int64_t ld, int64_t count, int64_t steps, int64_t D, bf16* out) {
  const int64_t tiles = D / R;
  const auto row_of = [&](int64_t key, int64_t e) {
    return key < count ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + key * ld + e * R)))
                       : _mm512_setzero_si512();
  };
  for (int64_t step = 0; step < steps; ++step)
    for (int64_t i = 0; i < R; ++i)
      for (int64_t e = 0; e < tiles; ++e) {
        const int64_t key = step * KW + 2 * i;
        const __m512i pairs = _mm512_or_si512(row_of(key, e), _mm512_slli_epi32(row_of(key + 1, e), 16));
        _mm512_storeu_si512(out + ((step * tiles + e) * R + i) * KW, pairs);
      }
}

// C[:, 16j .. 16j + 15] (16 rows, stride ldc) = A (16 rows of `steps` x 32 values, stride lda) times
// packed tile column j (tile (j, step) at b + (j * stride_j + step * stride_step) * TILE), j < N
template <int N>
void product(const bf16* a, int64_t lda, const bf16* b, int64_t stride_j, int64_t stride_step, int64_t steps, float* c, int64_t ldc,
             bool accumulate) {
  if (accumulate) {
    _tile_loadd(0, c, ldc * 4);
    if (N > 1) _tile_loadd(1, c + R, ldc * 4);
    if (N > 2) _tile_loadd(2, c + 2 * R, ldc * 4);
    if (N > 3) _tile_loadd(3, c + 3 * R, ldc * 4);
  } else {
    _tile_zero(0);
    if (N > 1) _tile_zero(1);
    if (N > 2) _tile_zero(2);
    if (N > 3) _tile_zero(3);
  }
  for (int64_t step = 0; step < steps; ++step) {
    const bf16* bs = b + step * stride_step * TILE;
    _tile_loadd(4, a + step * KW, lda * 2);
    _tile_loadd(6, bs, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (N > 1) { _tile_loadd(7, bs + stride_j * TILE, 64); _tile_dpbf16ps(1, 4, 7); }
    if (N > 2) { _tile_loadd(6, bs + 2 * stride_j * TILE, 64); _tile_dpbf16ps(2, 4, 6); }
    if (N > 3) { _tile_loadd(7, bs + 3 * stride_j * TILE, 64); _tile_dpbf16ps(3, 4, 7); }
  }
  _tile_stored(0, c, ldc * 4);
  if (N > 1) _tile_stored(1, c + R, ldc * 4);
  if (N > 2) _tile_stored(2, c + 2 * R, ldc * 4);
  if (N > 3) _tile_stored(3, c + 3 * R, ldc * 4);
}

// C (32 rows, stride ldc) = A (32 rows) times packed tile columns j < COLS, as above: each B tile
// read once for two A tiles (B, read from L2, is what bounds these products)
template <int COLS>
void product_tall(const bf16* a, int64_t lda, const bf16* b, int64_t stride_j, int64_t stride_step, int64_t steps, float* c,
                  int64_t ldc, bool accumulate) {
  float* c1 = c + R * ldc;
  if (accumulate) {
    _tile_loadd(0, c, ldc * 4);
    _tile_loadd(2, c1, ldc * 4);
    if (COLS > 1) { _tile_loadd(1, c + R, ldc * 4); _tile_loadd(3, c1 + R, ldc * 4); }
  } else {
    _tile_zero(0);
    _tile_zero(2);
    if (COLS > 1) { _tile_zero(1); _tile_zero(3); }
  }
  for (int64_t step = 0; step < steps; ++step) {
    const bf16* bs = b + step * stride_step * TILE;
    _tile_loadd(4, a + step * KW, lda * 2);
    _tile_loadd(5, a + R * lda + step * KW, lda * 2);
    _tile_loadd(6, bs, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 5, 6);
    if (COLS > 1) {
      _tile_loadd(7, bs + stride_j * TILE, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(2, c1, ldc * 4);
  if (COLS > 1) { _tile_stored(1, c + R, ldc * 4); _tile_stored(3, c1 + R, ldc * 4); }
}

// C (16 or 32 rows: `groups` of 16) = A times `columns` packed tile columns
void products(const bf16* a, int64_t lda, int64_t groups, const bf16* b, int64_t stride_j, int64_t stride_step, int64_t steps,
              int64_t columns, float* c, int64_t ldc, bool accumulate) {
  if (groups == 2) {
    for (int64_t j = 0; j < columns; j += 2) {
      if (columns - j >= 2) product_tall<2>(a, lda, b + j * stride_j * TILE, stride_j, stride_step, steps, c + j * R, ldc, accumulate);
      else product_tall<1>(a, lda, b + j * stride_j * TILE, stride_j, stride_step, steps, c + j * R, ldc, accumulate);
    }
    return;
  }
  for (int64_t j = 0; j < columns; j += 4) {
    const bf16* bj = b + j * stride_j * TILE;
    switch (std::min<int64_t>(4, columns - j)) {
      case 4: product<4>(a, lda, bj, stride_j, stride_step, steps, c + j * R, ldc, accumulate); break;
      case 3: product<3>(a, lda, bj, stride_j, stride_step, steps, c + j * R, ldc, accumulate); break;
      case 2: product<2>(a, lda, bj, stride_j, stride_step, steps, c + j * R, ldc, accumulate); break;
      default: product<1>(a, lda, bj, stride_j, stride_step, steps, c + j * R, ldc, accumulate);
    }
  }
}

// softmax_row over n columns (a multiple of 16) into bf16: each pass a masked one over whole vectors
// (the visible keys are ~100 columns of a row in two ranges; per-range loops with partial vectors
// took twice as long)
void softmax_row(float* s, bf16* out, int64_t n, int64_t a0, int64_t a1, int64_t b0, int64_t b1, float scale) {
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const auto visible = [&](int64_t j) {
    const __m512i column = _mm512_add_epi32(_mm512_set1_epi32(j), lanes);
    const auto in = [&](int64_t lo, int64_t hi) {
      return _mm512_cmpge_epi32_mask(column, _mm512_set1_epi32(lo)) & _mm512_cmplt_epi32_mask(column, _mm512_set1_epi32(hi));
    };
    return static_cast<__mmask16>(in(a0, a1) | in(b0, b1));
  };
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += R) top = _mm512_mask_max_ps(top, visible(j), top, _mm512_loadu_ps(s + j));
  const Vec shift(_mm512_reduce_max_ps(top) * scale);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += R) {
    const __m512 e = _mm512_maskz_mov_ps(visible(j), (Vec::loadu(s + j) * Vec(scale) - shift).exp_u20());
    _mm512_storeu_ps(s + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  const Vec inv(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n; j += R) darl_vec::store_rounded(Vec::loadu(s + j) * inv, out + j);
}

void attend(const bf16* q, int64_t q_token_stride, int64_t q_head_stride, const bf16* k, const bf16* v, const bf16* prefix_k,
            const bf16* prefix_v, const int64_t* cu, int64_t N, int64_t P, int64_t H, int64_t Hkv, int64_t D, int64_t T, float scale,
            int64_t window, bf16* out) {
  const int64_t G = H / Hkv, ld_kv = Hkv * D, steps_d = D / KW, tiles_d = D / R;
  const auto blocks = blocks_of(cu, N, G);
  int64_t tokens = 0, keys = 0;  // the most query tokens and own keys of a block
  for (const auto& b : blocks) tokens = std::max(tokens, b.t1 - b.t0), keys = std::max(keys, b.t1 - b.key0);
  // score columns: the prefix's keys [0, P) padded to 32, then the block's own keys padded to 32
  const int64_t P32 = round_up(P, KW), own32 = round_up(keys, KW), ld_s = P32 + own32, rows = round_up(tokens * G, 2 * R);
  Buffer<bf16> prefix_keys(Hkv * P32 * D), prefix_values(Hkv * P32 * D);
  for (int64_t h = 0; h < Hkv; ++h) {
    pack_keys(prefix_k + h * D, ld_kv, P, P32 / R, D, prefix_keys.data + h * P32 * D);
    pack_values(prefix_v + h * D, ld_kv, P, P32 / KW, D, prefix_values.data + h * P32 * D);
  }
  const bool rows_in_place = Hkv == 1 && q_head_stride == D && q_token_stride == H * D;
  at::parallel_for(0, blocks.size() * Hkv, 1, [&](int64_t begin, int64_t end) {
    Buffer<float> S(rows * ld_s), O(2 * R * D);
    Buffer<bf16> probs(rows * ld_s), own_k(own32 * D), own_v(own32 * D), rows_q(rows_in_place ? 2 * R * D : rows * D);
    configure();
    for (int64_t task = begin; task < end; ++task) {
      const Block& b = blocks[task / Hkv];
      const int64_t h = task % Hkv, M = (b.t1 - b.t0) * G, own_keys = b.t1 - b.key0, width = round_up(own_keys, KW);
      if (M == 0) continue;
      const bf16* Q = q + b.t0 * H * D;
      if (!rows_in_place) {
        for (int64_t t = b.t0; t < b.t1; ++t)
          for (int64_t g = 0; g < G; ++g)
            std::copy_n(q + t * q_token_stride + (h * G + g) * q_head_stride, D, rows_q.data + ((t - b.t0) * G + g) * D);
        Q = rows_q.data;
      }
      pack_keys(k + b.key0 * ld_kv + h * D, ld_kv, own_keys, width / R, D, own_k.data);
      pack_values(v + b.key0 * ld_kv + h * D, ld_kv, own_keys, width / KW, D, own_v.data);
      for (int64_t r0 = 0; r0 < M; r0 += 2 * R) {  // S, 32 rows at a time (16 for the last if so)
        const int64_t groups = M - r0 > R ? 2 : 1;
        const bf16* A = Q + r0 * D;
        if (rows_in_place && (b.t0 * G + r0 + groups * R) > T * G) {  // q's last rows: a tile would read past them
          std::copy_n(A, (M - r0) * D, rows_q.data);
          A = rows_q.data;
        }
        float* s = S.data + r0 * ld_s;
        if (P) products(A, D, groups, prefix_keys.data + h * P32 * D, steps_d, 1, steps_d, P32 / R, s, ld_s, false);
        products(A, D, groups, own_k.data, steps_d, 1, steps_d, width / R, s + P32, ld_s, false);
      }
      for (int64_t n = b.first; n < b.last; ++n) {
        const int64_t own = P32 + cu[n] - b.key0;  // the item's first key's score column
        for (int64_t token = std::max(cu[n], b.t0); token < std::min(cu[n + 1], b.t1); ++token) {
          const int64_t t = token - cu[n];  // the token within its item, at position P + t
          const int64_t lo = window > 0 ? std::max<int64_t>(0, P + t - window + 1) : 0;  // keys before: outside the window
          for (int64_t r = (token - b.t0) * G; r < (token - b.t0 + 1) * G; ++r)
            softmax_row(S.data + r * ld_s, probs.data + r * ld_s, P32 + width, std::min(lo, P), P, own + std::max<int64_t>(0, lo - P),
                        own + t + 1, scale);
        }
      }
      for (int64_t r0 = 0; r0 < M; r0 += 2 * R) {  // O, 32 rows at a time
        const int64_t groups = M - r0 > R ? 2 : 1;
        const bf16* p = probs.data + r0 * ld_s;
        if (P) products(p, ld_s, groups, prefix_values.data + h * P32 * D, 1, tiles_d, P32 / KW, tiles_d, O.data, D, false);
        products(p + P32, ld_s, groups, own_v.data, 1, tiles_d, width / KW, tiles_d, O.data, D, P > 0);
        for (int64_t r = r0; r < std::min(r0 + 2 * R, M); ++r) {
          const int64_t t = b.t0 + r / G, g = r % G;
          at::vec::convert(O.data + (r - r0) * D, out + (t * H + h * G + g) * D, D);
        }
      }
    }
    _tile_release();
  });
}

}  // namespace amx
#endif

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
#if defined(DARL_AMX)
  if (q.scalar_type() == at::kBFloat16 && D % amx::KW == 0 && amx::ready()) {
    using amx::bf16;
    amx::attend(qc.data_ptr<bf16>(), qc.stride(0), qc.stride(1), kc.data_ptr<bf16>(), vc.data_ptr<bf16>(), pk.data_ptr<bf16>(),
                pv.data_ptr<bf16>(), cu.data_ptr<int64_t>(), N, P, H, Hkv, D, T, scale, sliding_window, out.data_ptr<bf16>());
    return out;
  }
#endif
  AT_DISPATCH_V2(q.scalar_type(), "shared_prefix_attention", AT_WRAP([&] {
    attend(qc.data_ptr<scalar_t>(), qc.stride(0), qc.stride(1), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
           pk.data_ptr<scalar_t>(), pv.data_ptr<scalar_t>(), cu.data_ptr<int64_t>(), N, P, H, Hkv, D, scale, sliding_window,
           out.data_ptr<scalar_t>());
  }), at::kFloat, at::kBFloat16);
  return out;
}

}  // namespace

// whether a bf16 call takes the AMX path (a head dim that is a multiple of 32)
bool attention_uses_amx() {
#if defined(DARL_AMX)
  return amx::ready();
#else
  return false;
#endif
}

TORCH_LIBRARY_FRAGMENT(darl_infer_cpu, m) {
  m.def("attention_uses_amx() -> bool");
  m.impl("attention_uses_amx", c10::DispatchKey::CatchAll, &attention_uses_amx);
  m.def("shared_prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, Tensor cu_seqlens, "
        "float scale, int sliding_window) -> Tensor");
  m.impl("shared_prefix_attention", c10::DispatchKey::CPU, &shared_prefix_attention);
}
