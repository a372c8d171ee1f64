// Block-sparse causal attention on the CPU: the kernel of the `native` backend.
//
// Inputs are in cube-major, block-padded order (see adaspark/ops/attention/blocks.py):
//   q       [B, Hq, Sq, D] float32 contiguous      k, v [B, Hkv, Sk, D] float32 contiguous
//   kind    [B, Hq, nQ, nK] uint8: 0 = block not kept, 1 = partial (token mask), 2 = full
//   table   [B, Hq, U, C] uint8: query unit u of head h attends key class c
//   q_unit  [B, Sq] int64, k_cls [B, Sk] int64, q_pos [B, Sq] int64, k_pos [B, Sk] int64
//   k_valid [B, Sk] uint8, q_valid [B, Sq] uint8
//   group   query heads stacked into one task (1, or Hq / Hkv: the heads of a GQA group)
//   chunk   key blocks per step of the online softmax
// Output [B, Hq, Sq, D] float32 (rows of padded / invalid queries are zero).
//
// One task per (sample, head group, query block): the union of the key blocks its heads keep is
// walked in chunks; in each chunk, every run of consecutive key blocks is one S = Q K^T and one
// O += P V matrix product on the keys and values read in place (BLAS calls on strided tiles, no
// tensor objects per step) — or, when the runs are short (scattered cubes), the chunk's blocks are
// copied into one tile for one product each — the mask is applied block by block (skipped blocks
// -inf, partial blocks token by token, full blocks untouched), then an online-softmax update. Tasks are spread over the intra-op threads in a strided order (later query blocks
// attend more keys) with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Row-major matrix products on strided tiles (leading dimensions in elements):
//   gemm_abt:    C[M×N]  = A[M×K] · B[N×K]^T
//   gemm_ab_acc: C[M×N] += A[M×K] · B[K×N]
// With ADASPARK_SGEMM (defined by the build when libtorch exports the BLAS `sgemm_` it was linked
// with, e.g. MKL) they are direct BLAS calls: no tensor objects, no copies; otherwise ATen products
// on strided views.
#ifdef ADASPARK_SGEMM
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

inline void gemm_abt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc) {
  // column-major view: C^T (N×M) = B (N×K) · A^T (K×M)
  const char ta = 'T', tb = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.0f, zero = 0.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &zero, C, &lc);
}

inline void gemm_ab_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                        int64_t ldb, float* C, int64_t ldc) {
  // column-major view: C^T (N×M) += B^T (N×K) · A^T (K×M)
  const char ta = 'N', tb = 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
  const float one = 1.0f;
  sgemm_(&ta, &tb, &m, &n, &k, &one, B, &la, A, &lb, &one, C, &lc);
}
#else
inline at::Tensor tile(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

inline void gemm_abt(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                     int64_t ldb, float* C, int64_t ldc) {
  tile(C, M, N, ldc).copy_(at::mm(tile(A, M, K, lda), tile(B, N, K, ldb).t()));
}

inline void gemm_ab_acc(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                        int64_t ldb, float* C, int64_t ldc) {
  tile(C, M, N, ldc).add_(at::mm(tile(A, M, K, lda), tile(B, K, N, ldb)));
}
#endif

// exp(x - shift) over a row, in place; returns the row's sum. -inf entries give exactly 0.
// AVX-512 / AVX2: a degree-6 polynomial after range reduction by ln 2 (relative error ~2e-7, within
// float rounding of expf), 16 / 8 lanes at a time; elsewhere std::exp.
inline float exp_shift_sum(float* row, int64_t n, float shift) {
  int64_t x = 0;
  float sum = 0.0f;
#if defined(__AVX512F__)
  {  // the same polynomial, 16 lanes
    const __m512 vshift = _mm512_set1_ps(shift);
    const __m512 lo = _mm512_set1_ps(-87.3f), hi = _mm512_set1_ps(88.3f);
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    const __m512 c1 = _mm512_set1_ps(1.9875691500e-4f), c2 = _mm512_set1_ps(1.3981999507e-3f);
    const __m512 c3 = _mm512_set1_ps(8.3334519073e-3f), c4 = _mm512_set1_ps(4.1665795894e-2f);
    const __m512 c5 = _mm512_set1_ps(1.6666665459e-1f), c6 = _mm512_set1_ps(5.0000001201e-1f);
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 acc = _mm512_setzero_ps();
    for (; x + 16 <= n; x += 16) {
      const __m512 v0 = _mm512_sub_ps(_mm512_loadu_ps(row + x), vshift);
      const __mmask16 under = _mm512_cmp_ps_mask(v0, lo, _CMP_LT_OQ);  // also catches -inf
      const __mmask16 nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q);  // NaN stays NaN
      const __m512 v = _mm512_min_ps(_mm512_max_ps(v0, lo), hi);
      const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_fnmadd_ps(k, ln2_hi, v);
      r = _mm512_fnmadd_ps(k, ln2_lo, r);
      __m512 p = c1;
      p = _mm512_fmadd_ps(p, r, c2);
      p = _mm512_fmadd_ps(p, r, c3);
      p = _mm512_fmadd_ps(p, r, c4);
      p = _mm512_fmadd_ps(p, r, c5);
      p = _mm512_fmadd_ps(p, r, c6);
      const __m512 r2 = _mm512_mul_ps(r, r);
      p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, one));
      const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23);
      __m512 y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
      y = _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);
      y = _mm512_mask_mov_ps(y, nan, v0);
      _mm512_storeu_ps(row + x, y);
      acc = _mm512_add_ps(acc, y);
    }
    sum += _mm512_reduce_add_ps(acc);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vshift = _mm256_set1_ps(shift);
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
  const __m256 c1 = _mm256_set1_ps(1.9875691500e-4f), c2 = _mm256_set1_ps(1.3981999507e-3f);
  const __m256 c3 = _mm256_set1_ps(8.3334519073e-3f), c4 = _mm256_set1_ps(4.1665795894e-2f);
  const __m256 c5 = _mm256_set1_ps(1.6666665459e-1f), c6 = _mm256_set1_ps(5.0000001201e-1f);
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 acc = _mm256_setzero_ps();
  for (; x + 8 <= n; x += 8) {
    const __m256 v0 = _mm256_sub_ps(_mm256_loadu_ps(row + x), vshift);
    const __m256 under = _mm256_cmp_ps(v0, lo, _CMP_LT_OQ);  // also catches -inf
    const __m256 nan = _mm256_cmp_ps(v0, v0, _CMP_UNORD_Q);  // NaN stays NaN (never silently 0)
    __m256 v = _mm256_min_ps(_mm256_max_ps(v0, lo), hi);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2_hi, v);
    r = _mm256_fnmadd_ps(k, ln2_lo, r);
    __m256 p = c1;
    p = _mm256_fmadd_ps(p, r, c2);
    p = _mm256_fmadd_ps(p, r, c3);
    p = _mm256_fmadd_ps(p, r, c4);
    p = _mm256_fmadd_ps(p, r, c5);
    p = _mm256_fmadd_ps(p, r, c6);
    const __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, one));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    y = _mm256_andnot_ps(under, y);
    y = _mm256_blendv_ps(y, v0, nan);
    _mm256_storeu_ps(row + x, y);
    acc = _mm256_add_ps(acc, y);
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, acc);
  for (int i = 0; i < 8; ++i) sum += tmp[i];
#endif
  for (; x < n; ++x) {
    const float e = std::exp(row[x] - shift);
    row[x] = e;
    sum += e;
  }
  return sum;
}

inline float row_max(const float* row, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  int64_t x = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_set1_ps(mx);
  __m256 bad = _mm256_setzero_ps();
  for (; x + 8 <= n; x += 8) {
    const __m256 r = _mm256_loadu_ps(row + x);
    acc = _mm256_max_ps(acc, r);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(r, r, _CMP_UNORD_Q));
  }
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, acc);
  for (int i = 0; i < 8; ++i) mx = tmp[i] > mx ? tmp[i] : mx;
  if (_mm256_movemask_ps(bad)) return std::numeric_limits<float>::quiet_NaN();
#endif
  for (; x < n; ++x) {
    if (std::isnan(row[x])) return std::numeric_limits<float>::quiet_NaN();
    mx = row[x] > mx ? row[x] : mx;
  }
  return mx;
}


inline float dot(const float* a, const float* b, int64_t n) {
  int64_t x = 0;
  float sum = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; x + 16 <= n; x += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + x), _mm256_loadu_ps(b + x), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + x + 8), _mm256_loadu_ps(b + x + 8), acc1);
  }
  for (; x + 8 <= n; x += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + x), _mm256_loadu_ps(b + x), acc0);
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, _mm256_add_ps(acc0, acc1));
  for (int i = 0; i < 8; ++i) sum += tmp[i];
#endif
  for (; x < n; ++x) sum += a[x] * b[x];
  return sum;
}

inline void axpy(float* o, float w, const float* v, int64_t n) {
  int64_t x = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 vw = _mm256_set1_ps(w);
  for (; x + 8 <= n; x += 8)
    _mm256_storeu_ps(o + x, _mm256_fmadd_ps(vw, _mm256_loadu_ps(v + x), _mm256_loadu_ps(o + x)));
#endif
  for (; x < n; ++x) o[x] += w * v[x];
}

// a key/value row as float32: in place for float, converted into `buf` for bfloat16
inline const float* as_float(const float* row, int64_t, float*) { return row; }
inline const float* as_float(const at::BFloat16* row, int64_t n, float* buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(row);
  int64_t x = 0;
#if defined(__AVX2__)
  for (; x + 8 <= n; x += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bits + x));
    _mm256_storeu_ps(buf + x, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
#endif
  for (; x < n; ++x) {
    const uint32_t u = static_cast<uint32_t>(bits[x]) << 16;
    std::memcpy(buf + x, &u, sizeof(float));
  }
  return buf;
}

// Few queries (decoding) against the rows of a long cache that their selection keeps, read in place.
//   q         [B, Hq, Nq, D] float32 contiguous   k, v [B, Hkv, Nk, D] float32 or bfloat16 (rows contiguous)
//   table     [B, Hq, Nq, C+1] uint8: head h's query i attends key class c (class C: non-video keys);
//             it already holds the own cube and the non-video class, and is all zero for padding queries
//   cube_ids  [B, Nk] int64 (-1: non-video, class C)   k_valid [B, Nk], q_valid [B, Nq] bool or uint8
//   query i sits at position q_offset + i
// Per (sample, kv head) the rows some head of the GQA group may attend are collected in one pass (the
// union of the group's classes, up to the last valid query); they are then processed in tiles of
// ROWS_TILE: the tile's K rows are copied into a dense buffer (bfloat16 converted), S = Q K^T is one
// matrix product for the group's g·Nq query rows, the per-head class mask and causality are applied,
// an online softmax updates the row statistics, and O += P V is a second product on the copied V
// rows. Tasks are (sample, kv head, split of the rows), merged at the end (split-K, as
// flash-decoding does). Returns (out, rows read per (sample, kv head), attended pairs per (sample, head)).
constexpr int64_t ROWS_TILE = 64;
// block_attention copies a chunk's key (value) blocks into one tile when its runs of consecutive
// blocks are shorter than this on average (one matrix product beats many small ones), else reads
// them in place run by run (measured at 32k tokens, 7/1 heads, d 128: scattered cubes 8% faster
// copied; long runs 28% slower copied)
constexpr int64_t GATHER_RUN_BLOCKS = 4;

// The few query rows of a decode step against a tile of key/value rows, register-blocked: RB query
// rows at a time, each key (value) row read once per block of RB rows and D in 8-float chunks.
//   rows_qk: s[r * lds + j] = q[r] · krow[j]            (q: R rows of D floats, contiguous)
//   rows_pv: o[r * D + x] += Σ_j p[r * ldp + j] · vrow[j][x]
// (BLAS products of R = 7 rows run at a fraction of their peak; these do not.)
#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 x = _mm_add_ps(lo, hi);
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t x = 0; x < D; x += 16) _mm_prefetch(reinterpret_cast<const char*>(row + x), _MM_HINT_T0);
}

template <int RB>
inline void rows_qk_block(const float* q, const float* const* krow, int64_t n, int64_t D, float* s, int64_t lds) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t j = 0; j < n; ++j) {
    const float* kr = krow[j];
    if (j + 8 < n) prefetch_row(krow[j + 8], D);
    __m256 acc[RB];
    for (int rb = 0; rb < RB; ++rb) acc[rb] = _mm256_setzero_ps();
    for (int64_t x = 0; x < D8; x += 8) {
      const __m256 kv = _mm256_loadu_ps(kr + x);
      for (int rb = 0; rb < RB; ++rb) acc[rb] = _mm256_fmadd_ps(_mm256_loadu_ps(q + rb * D + x), kv, acc[rb]);
    }
    for (int rb = 0; rb < RB; ++rb) {
      float sum = hsum(acc[rb]);
      for (int64_t x = D8; x < D; ++x) sum += q[rb * D + x] * kr[x];
      s[rb * lds + j] = sum;
    }
  }
}

template <int RB>
inline void rows_pv_block(const float* p, int64_t ldp, const float* const* vrow, int64_t n, int64_t D, float* o) {
  const int64_t D8 = D / 8 * 8;
  // a few value rows at a time (read row by row, then held in L1 across the D chunks)
  constexpr int64_t JB = 8;
  for (int64_t j0 = 0; j0 < n; j0 += JB) {
    const int64_t j1 = std::min(n, j0 + JB);
    for (int64_t j = j1; j < std::min(n, j1 + JB); ++j) prefetch_row(vrow[j], D);
    for (int64_t x = 0; x < D8; x += 8) {
      __m256 acc[RB];
      for (int rb = 0; rb < RB; ++rb) acc[rb] = _mm256_loadu_ps(o + rb * D + x);
      for (int64_t j = j0; j < j1; ++j) {
        const __m256 vv = _mm256_loadu_ps(vrow[j] + x);
        for (int rb = 0; rb < RB; ++rb) acc[rb] = _mm256_fmadd_ps(_mm256_set1_ps(p[rb * ldp + j]), vv, acc[rb]);
      }
      for (int rb = 0; rb < RB; ++rb) _mm256_storeu_ps(o + rb * D + x, acc[rb]);
    }
  }
  for (int64_t x = D8; x < D; ++x)
    for (int rb = 0; rb < RB; ++rb) {
      float acc = o[rb * D + x];
      for (int64_t j = 0; j < n; ++j) acc += p[rb * ldp + j] * vrow[j][x];
      o[rb * D + x] = acc;
    }
}

// blocks of 8 query rows, the rest in one block of its own size (GQA groups of 1..8 heads: one pass)
#define ADASPARK_ROW_BLOCKS(CALL) \
  switch (rb) {                   \
    case 8: CALL(8); break;       \
    case 7: CALL(7); break;       \
    case 6: CALL(6); break;       \
    case 5: CALL(5); break;       \
    case 4: CALL(4); break;       \
    case 3: CALL(3); break;       \
    case 2: CALL(2); break;       \
    default: CALL(1); break;      \
  }

inline void rows_qk(const float* q, int64_t R, const float* const* krow, int64_t n, int64_t D, float* s, int64_t lds) {
  for (int64_t r = 0; r < R; r += 8) {
    const int64_t rb = std::min<int64_t>(8, R - r);
#define QK(RB) rows_qk_block<RB>(q + r * D, krow, n, D, s + r * lds, lds)
    ADASPARK_ROW_BLOCKS(QK)
#undef QK
  }
}

inline void rows_pv(const float* p, int64_t ldp, int64_t R, const float* const* vrow, int64_t n, int64_t D, float* o) {
  for (int64_t r = 0; r < R; r += 8) {
    const int64_t rb = std::min<int64_t>(8, R - r);
#define PV(RB) rows_pv_block<RB>(p + r * ldp, ldp, vrow, n, D, o + r * D)
    ADASPARK_ROW_BLOCKS(PV)
#undef PV
  }
}
#undef ADASPARK_ROW_BLOCKS
#else
inline void rows_qk(const float* q, int64_t R, const float* const* krow, int64_t n, int64_t D, float* s, int64_t lds) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j) s[r * lds + j] = dot(q + r * D, krow[j], D);
}

inline void rows_pv(const float* p, int64_t ldp, int64_t R, const float* const* vrow, int64_t n, int64_t D, float* o) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < n; ++j)
      if (p[r * ldp + j] != 0.0f) axpy(o + r * D, p[r * ldp + j], vrow[j], D);
}
#endif

// pointers to `n` rows of a K or V head (`pos` their positions, `stride` the row stride), as float32:
// in place for float, converted into `buf` (n × D) for bfloat16
inline void row_pointers(const float* base, int64_t stride, const int64_t* pos, int64_t n, int64_t, float*,
                         const float** out) {
  for (int64_t j = 0; j < n; ++j) out[j] = base + pos[j] * stride;
}
inline void row_pointers(const at::BFloat16* base, int64_t stride, const int64_t* pos, int64_t n, int64_t D,
                         float* buf, const float** out) {
  for (int64_t j = 0; j < n; ++j) out[j] = as_float(base + pos[j] * stride, D, buf + j * D);
}

template <typename scalar_t>
void rows_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const uint8_t* table_p,
                         const int64_t* ids_p, const uint8_t* k_valid_p, const uint8_t* q_valid_p, int64_t C1,
                         int64_t q_offset, double scale, at::Tensor& out, at::Tensor& counts,
                         at::Tensor& attended) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  const int64_t g = Hq / Hkv, R = g * Nq;
  const float neg = -std::numeric_limits<float>::infinity();
  const float fscale = static_cast<float>(scale);
  // 1. the rows of every (sample, kv head): ascending positions of the group's classes
  std::vector<std::vector<int64_t>> rows(B * Hkv);
  int64_t* counts_p = counts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = -1;
    for (int64_t i = 0; i < Nq; ++i)
      if (q_valid_p[b * Nq + i]) last = q_offset + i;
    for (int64_t kvh = 0; kvh < Hkv; ++kvh) {
      std::vector<uint8_t> uni(C1, 0);
      const uint8_t* tg = table_p + (b * Hq + kvh * g) * Nq * C1;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C1; ++c) uni[c] |= tg[r * C1 + c];
      std::vector<int64_t>& rl = rows[b * Hkv + kvh];
      const int64_t* ids = ids_p + b * Nk;
      const uint8_t* kv = k_valid_p + b * Nk;
      for (int64_t pos = 0; pos <= last && pos < Nk; ++pos) {
        const int64_t cls = ids[pos] < 0 ? C1 - 1 : ids[pos];
        if (kv[pos] && uni[cls]) rl.push_back(pos);
      }
      counts_p[b * Hkv + kvh] = static_cast<int64_t>(rl.size());
    }
  }
  // 2. tasks: (sample, kv head, split of its rows)
  const int64_t threads = at::get_num_threads();
  int64_t longest = 1;
  for (const auto& rl : rows) longest = std::max<int64_t>(longest, static_cast<int64_t>(rl.size()));
  const int64_t per = std::max<int64_t>(8 * ROWS_TILE, (longest + threads - 1) / std::max<int64_t>(1, threads));
  const int64_t splits = (longest + per - 1) / per;
  const int64_t n_tasks = B * Hkv * splits;
  std::vector<float> pm(n_tasks * R, neg), pl(n_tasks * R, 0.0f), po(n_tasks * R * D, 0.0f);
  std::vector<double> patt(n_tasks * R, 0.0);
  std::vector<uint8_t> pnan(n_tasks * R, 0);
  const float* qd = q.data_ptr<float>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> qs(R * D), buf(std::is_same<scalar_t, float>::value ? 0 : ROWS_TILE * D), s(R * ROWS_TILE);
    std::vector<const float*> ptr(ROWS_TILE);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t sp = t % splits, kvh = (t / splits) % Hkv, b = t / (splits * Hkv);
      const std::vector<int64_t>& rl = rows[b * Hkv + kvh];
      const int64_t n_rows = static_cast<int64_t>(rl.size());
      const int64_t j0 = sp * per, j1 = std::min(n_rows, j0 + per);
      if (j0 >= j1) continue;
      for (int64_t r = 0; r < R; ++r) {  // row r = (head hh, query i), scaled
        const float* src = qd + ((b * Hq + kvh * g) * Nq + r) * D;
        for (int64_t x = 0; x < D; ++x) qs[r * D + x] = src[x] * fscale;
      }
      float* tm = pm.data() + t * R;
      float* tl = pl.data() + t * R;
      float* to = po.data() + t * R * D;
      double* ta = patt.data() + t * R;
      uint8_t* tn = pnan.data() + t * R;
      const scalar_t* kbase = kd + b * ks0 + kvh * ks1;
      const scalar_t* vbase = vd + b * vs0 + kvh * vs1;
      const uint8_t* tg = table_p + (b * Hq + kvh * g) * Nq * C1;
      const int64_t* ids = ids_p + b * Nk;
      // per class: which of the R query rows attend it (R <= 64 bits; wider groups use the slow check)
      const bool bits_ok = R <= 64;
      std::vector<uint64_t> cbits(bits_ok ? C1 : 0, 0);
      if (bits_ok)
        for (int64_t r = 0; r < R; ++r)
          for (int64_t c = 0; c < C1; ++c)
            if (tg[r * C1 + c]) cbits[c] |= uint64_t{1} << r;
      const uint64_t all = R == 64 ? ~uint64_t{0} : ((uint64_t{1} << R) - 1);
      for (int64_t a = j0; a < j1; a += ROWS_TILE) {
        const int64_t n = std::min(ROWS_TILE, j1 - a);
        row_pointers(kbase, ks2, rl.data() + a, n, D, buf.data(), ptr.data());
        rows_qk(qs.data(), R, ptr.data(), n, D, s.data(), ROWS_TILE);
        // the mask: -inf where a row's head does not keep the key's class or the key is in its future
        int64_t full = 0;  // keys every query row attends
        for (int64_t jj = 0; jj < n; ++jj) {
          const int64_t pos = rl[a + jj];
          const int64_t cls = ids[pos] < 0 ? C1 - 1 : ids[pos];
          if (bits_ok && pos <= q_offset && cbits[cls] == all) {
            ++full;
            continue;
          }
          for (int64_t r = 0; r < R; ++r) {
            const bool keep = bits_ok ? ((cbits[cls] >> r) & 1) != 0 : tg[r * C1 + cls] != 0;
            if (keep && pos <= q_offset + r % Nq) {
              ta[r] += 1.0;
            } else {
              s[r * ROWS_TILE + jj] = neg;
            }
          }
        }
        for (int64_t r = 0; r < R; ++r) {
          float* row = s.data() + r * ROWS_TILE;
          ta[r] += static_cast<double>(full);
          if (tn[r]) continue;
          const float mx_tile = row_max(row, n);
          if (std::isnan(mx_tile)) {
            tn[r] = 1;
            continue;
          }
          const float mx = std::max(tm[r], mx_tile);
          if (mx == neg) {
            for (int64_t jj = 0; jj < n; ++jj) row[jj] = 0.0f;
            continue;
          }
          if (tm[r] != mx && tm[r] != neg) {
            const float alpha = std::exp(tm[r] - mx);
            tl[r] *= alpha;
            for (int64_t x = 0; x < D; ++x) to[r * D + x] *= alpha;
          }
          tm[r] = mx;
          tl[r] += exp_shift_sum(row, n, mx);
        }
        for (int64_t r = 0; r < R; ++r)
          if (tn[r] || tm[r] == neg)
            for (int64_t jj = 0; jj < n; ++jj) s[r * ROWS_TILE + jj] = 0.0f;
        row_pointers(vbase, vs2, rl.data() + a, n, D, buf.data(), ptr.data());
        rows_pv(s.data(), ROWS_TILE, R, ptr.data(), n, D, to);
      }
    }
  });
  // 3. merge the splits
  float* od = out.data_ptr<float>();
  double* att = attended.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t kvh = 0; kvh < Hkv; ++kvh)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t hh = r / Nq, i = r % Nq;
        float* dst = od + ((b * Hq + kvh * g + hh) * Nq + i) * D;
        float mx = neg;
        bool nan = false;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t t = (b * Hkv + kvh) * splits + sp;
          att[b * Hq + kvh * g + hh] += patt[t * R + r];
          nan |= pnan[t * R + r] != 0;
          mx = std::max(mx, pm[t * R + r]);
        }
        if (!q_valid_p[b * Nq + i]) continue;  // stays zero
        if (nan) {  // a non-finite input reaches the output, never silently dropped
          for (int64_t x = 0; x < D; ++x) dst[x] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        if (mx == neg) continue;  // nothing attended: stays zero
        float l = 0.0f;
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t t = (b * Hkv + kvh) * splits + sp;
          if (pm[t * R + r] == neg) continue;
          const float a = std::exp(pm[t * R + r] - mx);
          l += a * pl[t * R + r];
          axpy(dst, a, po.data() + (t * R + r) * D, D);
        }
        const float inv = 1.0f / l;
        for (int64_t x = 0; x < D; ++x) dst[x] *= inv;
      }
}

inline const uint8_t* bytes_of(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBool || t.scalar_type() == at::kByte, "rows_attention: masks must be bool or uint8");
  return reinterpret_cast<const uint8_t*>(t.data_ptr());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rows_attention(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& table,
                                                              const at::Tensor& cube_ids, const at::Tensor& k_valid,
                                                              const at::Tensor& q_valid, int64_t q_offset,
                                                              double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "rows_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous(), "rows_attention: q must be contiguous float32");
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && k.stride(3) == 1 && v.stride(3) == 1,
              "rows_attention: k and v must share a dtype and have contiguous rows");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "rows_attention: Hq must be a multiple of Hkv");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), Nk = k.size(2);
  TORCH_CHECK(table.scalar_type() == at::kByte && table.dim() == 4 && table.size(0) == B && table.size(1) == Hq &&
                  table.size(2) == Nq && table.size(3) >= 1,
              "rows_attention: table must be uint8 [B, Hq, Nq, C+1]");
  TORCH_CHECK(cube_ids.scalar_type() == at::kLong && cube_ids.size(0) == B && cube_ids.size(1) == Nk,
              "rows_attention: cube_ids must be int64 [B, Nk]");
  TORCH_CHECK(q_offset >= 0 && q_offset + Nq <= Nk, "rows_attention: the queries must be the last Nq positions");
  auto table_c = table.contiguous();
  auto ids_c = cube_ids.contiguous();
  auto kv_c = k_valid.contiguous();
  auto qv_c = q_valid.contiguous();
  TORCH_CHECK(kv_c.numel() == B * Nk && qv_c.numel() == B * Nq, "rows_attention: k_valid / q_valid have the wrong shape");
  auto out = at::zeros_like(q);
  auto counts = at::zeros({B, k.size(1)}, q.options().dtype(at::kLong));
  auto attended = at::zeros({B, Hq}, q.options().dtype(at::kDouble));
  const uint8_t* tp = table_c.data_ptr<uint8_t>();
  const int64_t* ip = ids_c.data_ptr<int64_t>();
  if (k.scalar_type() == at::kFloat) {
    rows_attention_impl<float>(q, k, v, tp, ip, bytes_of(kv_c), bytes_of(qv_c), table.size(3), q_offset, scale, out,
                               counts, attended);
  } else if (k.scalar_type() == at::kBFloat16) {
    rows_attention_impl<at::BFloat16>(q, k, v, tp, ip, bytes_of(kv_c), bytes_of(qv_c), table.size(3), q_offset,
                                      scale, out, counts, attended);
  } else {
    TORCH_CHECK(false, "rows_attention: k and v must be float32 or bfloat16");
  }
  return {out, counts, attended};
}

at::Tensor block_attention(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kind,
    const at::Tensor& table, const at::Tensor& q_unit, const at::Tensor& k_cls,
    const at::Tensor& q_pos, const at::Tensor& k_pos, const at::Tensor& k_valid,
    const at::Tensor& q_valid, int64_t block, int64_t group, int64_t chunk, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "block_attention: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat,
              "block_attention: q, k, v must be float32");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "block_attention: q, k, v must be contiguous");
  TORCH_CHECK(kind.scalar_type() == at::kByte && table.scalar_type() == at::kByte &&
                  k_valid.scalar_type() == at::kByte && q_valid.scalar_type() == at::kByte,
              "block_attention: kind, table, k_valid, q_valid must be uint8");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Sk = k.size(2);
  TORCH_CHECK(block >= 1 && Sq % block == 0 && Sk % block == 0, "block_attention: bad block size");
  TORCH_CHECK(Hq % Hkv == 0, "block_attention: Hq must be a multiple of Hkv");
  const int64_t g = Hq / Hkv;
  TORCH_CHECK(group >= 1 && g % group == 0, "block_attention: group must divide Hq / Hkv");
  const int64_t nQ = Sq / block, nK = Sk / block;
  TORCH_CHECK(kind.size(0) == B && kind.size(1) == Hq && kind.size(2) == nQ && kind.size(3) == nK,
              "block_attention: kind has the wrong shape");
  const int64_t U = table.size(2), C = table.size(3);
  const int64_t nG = Hq / group;
  const int64_t R = group * block;  // rows of one task
  chunk = std::max<int64_t>(1, chunk);

  auto kind_c = kind.contiguous();
  auto table_c = table.contiguous();
  auto q_unit_c = q_unit.contiguous();
  auto k_cls_c = k_cls.contiguous();
  auto q_pos_c = q_pos.contiguous();
  auto k_pos_c = k_pos.contiguous();
  auto k_valid_c = k_valid.contiguous();
  auto q_valid_c = q_valid.contiguous();
  const uint8_t* kind_p = kind_c.data_ptr<uint8_t>();
  const uint8_t* table_p = table_c.data_ptr<uint8_t>();
  const int64_t* q_unit_p = q_unit_c.data_ptr<int64_t>();
  const int64_t* k_cls_p = k_cls_c.data_ptr<int64_t>();
  const int64_t* q_pos_p = q_pos_c.data_ptr<int64_t>();
  const int64_t* k_pos_p = k_pos_c.data_ptr<int64_t>();
  const uint8_t* k_valid_p = k_valid_c.data_ptr<uint8_t>();
  const uint8_t* q_valid_p = q_valid_c.data_ptr<uint8_t>();
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();

  auto out = at::zeros_like(q);
  float* od = out.data_ptr<float>();
  const int64_t n_tasks = B * nG * nQ;
  const float neg = -std::numeric_limits<float>::infinity();
  const float fscale = static_cast<float>(scale);
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_tasks, 1));

  at::parallel_for(0, n_workers, 1, [&](int64_t w0, int64_t w1) {
    // per-thread buffers (sized for the largest chunk)
    std::vector<float> qt(R * D), sbuf(R * chunk * block), ot(R * D), kvbuf(chunk * block * D);
    std::vector<float> m(R), l(R);
    std::vector<int64_t> blocks, run_start, run_len;
    blocks.reserve(nK);
    float* qtp = qt.data();
    float* sp = sbuf.data();
    float* otp = ot.data();
    float* kvp = kvbuf.data();
    for (int64_t w = w0; w < w1; ++w) {
      for (int64_t t = w; t < n_tasks; t += n_workers) {
        const int64_t qb = t % nQ;
        const int64_t gi = (t / nQ) % nG;
        const int64_t b = t / (nQ * nG);
        const int64_t h0 = gi * group;
        const int64_t kvh = h0 / g;
        // rows of this block up to its last valid query (decoding: the few new tokens)
        int64_t rows = 0;
        for (int64_t i = 0; i < block; ++i)
          if (q_valid_p[b * Sq + qb * block + i]) rows = i + 1;
        if (rows == 0) continue;
        const int64_t RR = group * rows;
        // union of the kept key blocks of the group's heads, ascending
        blocks.clear();
        for (int64_t kb = 0; kb < nK; ++kb) {
          bool kept = false;
          for (int64_t hh = 0; hh < group; ++hh)
            kept |= kind_p[(((b * Hq + h0 + hh) * nQ + qb) * nK) + kb] != 0;
          if (kept) blocks.push_back(kb);
        }
        if (blocks.empty()) continue;
        // Q tile: the group's heads stacked, scaled
        for (int64_t hh = 0; hh < group; ++hh) {
          const float* src = qd + (((b * Hq + h0 + hh) * Sq) + qb * block) * D;
          float* dst = qtp + hh * rows * D;
          for (int64_t x = 0; x < rows * D; ++x) dst[x] = src[x] * fscale;
        }
        std::fill(m.begin(), m.end(), neg);
        std::fill(l.begin(), l.end(), 0.0f);
        std::fill(ot.begin(), ot.begin() + RR * D, 0.0f);
        const float* kbase = kd + (b * Hkv + kvh) * Sk * D;
        const float* vbase = vd + (b * Hkv + kvh) * Sk * D;
        const int64_t nb = static_cast<int64_t>(blocks.size());
        for (int64_t c0 = 0; c0 < nb; c0 += chunk) {
          const int64_t cn = std::min(chunk, nb - c0);
          const int64_t cols = cn * block;
          // runs of consecutive key blocks: (first chunk column, first block, blocks)
          run_start.clear();
          run_len.clear();
          for (int64_t j = 0; j < cn; ++j) {
            if (j > 0 && blocks[c0 + j] == blocks[c0 + j - 1] + 1) {
              ++run_len.back();
            } else {
              run_start.push_back(j);
              run_len.push_back(1);
            }
          }
          const int64_t n_runs = static_cast<int64_t>(run_start.size());
          // S = Q K^T over the chunk: keys read in place, one product per run of consecutive blocks,
          // unless the runs are short (scattered cubes): then copied into one tile, one product
          const bool gather = n_runs > 1 && n_runs * GATHER_RUN_BLOCKS > cn;
          if (gather) {
            for (int64_t j = 0; j < cn; ++j)
              std::memcpy(kvp + j * block * D, kbase + blocks[c0 + j] * block * D, block * D * sizeof(float));
            gemm_abt(RR, cols, D, qtp, D, kvp, D, sp, cols);
          } else {
            for (int64_t r = 0; r < n_runs; ++r) {
              const int64_t j0 = run_start[r], w = run_len[r] * block;
              gemm_abt(RR, w, D, qtp, D, kbase + blocks[c0 + j0] * block * D, D, sp + j0 * block, cols);
            }
          }
          // mask, block by block
          for (int64_t hh = 0; hh < group; ++hh) {
            const int64_t h = h0 + hh;
            for (int64_t j = 0; j < cn; ++j) {
              const int64_t kb = blocks[c0 + j];
              const uint8_t kk = kind_p[((b * Hq + h) * nQ + qb) * nK + kb];
              if (kk == 2) continue;
              for (int64_t i = 0; i < rows; ++i) {
                float* row = sp + (hh * rows + i) * cols + j * block;
                if (kk == 0) {
                  for (int64_t x = 0; x < block; ++x) row[x] = neg;
                  continue;
                }
                const int64_t qs = b * Sq + qb * block + i;
                const int64_t qp = q_pos_p[qs];
                const uint8_t* trow = table_p + ((b * Hq + h) * U + q_unit_p[qs]) * C;
                for (int64_t x = 0; x < block; ++x) {
                  const int64_t ks = b * Sk + kb * block + x;
                  const bool ok = k_valid_p[ks] && k_pos_p[ks] <= qp && trow[k_cls_p[ks]];
                  if (!ok) row[x] = neg;
                }
              }
            }
          }
          // online softmax update
          for (int64_t r = 0; r < RR; ++r) {
            float* row = sp + r * cols;
            const float mx = row_max(row, cols);
            const float m_new = mx > m[r] ? mx : m[r];
            // rows with nothing attended so far keep m = -inf (exp of -inf entries is 0)
            const float shift = m_new == neg ? 0.0f : m_new;
            const float alpha = std::exp(m[r] - shift);  // 0 while m[r] = -inf
            m[r] = m_new;
            l[r] = l[r] * alpha + exp_shift_sum(row, cols, shift);
            if (alpha != 1.0f) {
              float* orow = otp + r * D;
              for (int64_t x = 0; x < D; ++x) orow[x] *= alpha;
            }
          }
          // O += P V, the values read like the keys
          if (gather) {
            for (int64_t j = 0; j < cn; ++j)
              std::memcpy(kvp + j * block * D, vbase + blocks[c0 + j] * block * D, block * D * sizeof(float));
            gemm_ab_acc(RR, D, cols, sp, cols, kvp, D, otp, D);
          } else {
            for (int64_t r = 0; r < n_runs; ++r) {
              const int64_t j0 = run_start[r], w = run_len[r] * block;
              gemm_ab_acc(RR, D, w, sp + j0 * block, cols, vbase + blocks[c0 + j0] * block * D, D, otp, D);
            }
          }
        }
        // normalise and write back (invalid query rows stay zero)
        for (int64_t hh = 0; hh < group; ++hh) {
          float* dst = od + (((b * Hq + h0 + hh) * Sq) + qb * block) * D;
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = hh * rows + i;
            if (!q_valid_p[b * Sq + qb * block + i] || l[r] <= 0.0f) continue;
            const float inv = 1.0f / l[r];
            const float* orow = otp + r * D;
            for (int64_t x = 0; x < D; ++x) dst[i * D + x] = orow[x] * inv;
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(adaspark, m) {
  m.def(
      "block_attention(Tensor q, Tensor k, Tensor v, Tensor kind, Tensor table, Tensor q_unit, "
      "Tensor k_cls, Tensor q_pos, Tensor k_pos, Tensor k_valid, Tensor q_valid, int block, "
      "int group, int chunk, float scale) -> Tensor");
  m.def(
      "rows_attention(Tensor q, Tensor k, Tensor v, Tensor table, Tensor cube_ids, Tensor k_valid, "
      "Tensor q_valid, int q_offset, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaspark, CPU, m) {
  m.impl("block_attention", &block_attention);
  m.impl("rows_attention", &rows_attention);
}
