// Decode attention: a few query tokens per sequence against a long KV cache, split along the keys
// across thread blocks (flash-decoding) with a log-sum-exp merge.
//
// Grid: (num_splits, Hkv * row_groups, B). One block owns one KV head of one sequence, one slice
// of its keys, and up to ROWS "rows" = (query head of the group, query token) pairs, so K and V
// are read from HBM once for all query heads that share them (GQA). Within the block:
//
//   for each tile of TN keys (K and V tiles double-buffered in shared memory with cp.async):
//     A. scores   S[r, j] = q_r . k_j          thread = (key j, slice of D), partial sums
//     B. softmax  online max / sum per row      warp w owns rows w, w + 4, ...
//     C. output   acc[r, :] += p[r, j] v_j      thread = (16-byte chunk of D, slice of keys)
//   reduce acc over the key slices, write o / l and lse (one split) or fp32 partials (several)
//
// A second kernel merges the splits: lse = log sum_s exp(lse_s), o = sum_s exp(lse_s - lse) o_s.
// Scores live in the base-2 domain (q is pre-scaled by scale * log2(e)) so each exponential is
// one exp2f. Everything accumulates in fp32.
#include "attnkit_cuda.h"
#include "common.cuh"

#include <math.h>

namespace attnkit {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileElems = 4096;  // one K (or V) tile: TN x D = 4096 elements = 8 KiB
constexpr int kMaxSplits = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int D>
struct Cfg {
  static_assert(D == 64 || D == 128 || D == 256, "decode attention is built for D in {64, 128, 256}");
  static constexpr int TN = kTileElems / D;     // keys per tile: 64 / 32 / 16
  static constexpr int CH = D / kVec;           // 16-byte chunks per row: 8 / 16 / 32
  static constexpr int KS = kThreads / CH;      // key slices of phase C: 16 / 8 / 4
  static constexpr int NDP = kThreads / TN;     // D slices of phase A: 2 / 4 / 8
  static constexpr int DP = D / NDP;            // dims per phase-A slice: 32
  static constexpr int ROW_BYTES = D * 2 + 16;  // padded smem row: 16-byte accesses of 8
                                                // consecutive rows hit 8 distinct bank groups
  static constexpr int JPL = (TN + 31) / 32;    // keys per lane in phase B
  static_assert(kThreads % TN == 0 && kThreads % CH == 0, "thread mappings must tile the block");
  static_assert(TN % KS == 0, "each phase-C key slice gets the same number of keys");
  static_assert(DP % kVec == 0, "phase-A slices are whole 16-byte chunks");
  static_assert((TN * CH) % kThreads == 0, "tile copy: whole chunks per thread");
  static_assert(ROW_BYTES % 16 == 0, "cp.async destinations must be 16-byte aligned");
};

template <int D, int ROWS>
struct __align__(16) Smem {
  using C = Cfg<D>;
  union {
    struct {
      unsigned char k[2][C::TN * C::ROW_BYTES];  // two stages of K tiles
      unsigned char v[2][C::TN * C::ROW_BYTES];  // two stages of V tiles
    } tiles;
    float red[C::KS][ROWS][D];  // after the key loop: per-slice accumulators
  } u;
  float q[ROWS][D];             // q * scale * log2(e), zero for rows past the end
  float part[C::NDP][ROWS][C::TN];  // phase A partial scores
  float p[ROWS][C::TN];         // phase B probabilities of the current tile
  float alpha[ROWS];            // phase B rescale of the running accumulators
  float m[ROWS];                // final running max (base 2)
  float l[ROWS];                // final running sum
  unsigned char kvalid[C::TN];  // key inside [split start, split end) and not padded
};

// Keys [lo, hi) that some query of sequence b may see; shift = key position of query 0.
struct KeyRange {
  int lo, hi, shift;
};

__device__ __forceinline__ KeyRange key_range(const DecodeParams& p, int b) {
  KeyRange kr;
  const int len = p.seqlens_k ? min(max(p.seqlens_k[b], 0), p.Nk) : p.Nk;
  kr.shift = (p.seqlens_k ? len : p.Nk) - p.Nq;
  kr.lo = 0;
  kr.hi = len;
  if (p.window_left >= 0) kr.lo = max(kr.lo, kr.shift - p.window_left);
  if (p.window_right >= 0) kr.hi = min(kr.hi, kr.shift + p.Nq - 1 + p.window_right + 1);
  return kr;
}

// minBlocks = 1: with the default heuristic ptxas spilled 4 bytes in two fp16 ROWS=2 variants
// on sm_90; shared memory caps residency at 4-5 blocks per SM anyway.
template <typename T, int D, int ROWS>
__global__ void __launch_bounds__(kThreads, 1) decode_split_kernel(const DecodeParams p) {
  using C = Cfg<D>;
  static_assert(ROWS >= 1 && ROWS <= 8, "ROWS: 1..8 rows per block");
  static_assert(sizeof(Smem<D, ROWS>) <= 48 * 1024, "static shared memory limit");
  constexpr int RPW = (ROWS + kWarps - 1) / kWarps;  // phase-B rows per warp
  __shared__ Smem<D, ROWS> sm;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int S = p.num_splits, split = blockIdx.x;
  const int groups = gridDim.y / p.Hkv;  // row groups per KV head
  const int kvh = blockIdx.y / groups;
  const int row0 = (blockIdx.y % groups) * ROWS;
  const int b = blockIdx.z;
  const int G = p.Hq / p.Hkv;
  const int nrows = min(ROWS, G * p.Nq - row0);  // rows r < nrows are real
  // row r -> query head kvh * G + (row0 + r) / Nq, query token (row0 + r) % Nq

  const KeyRange kr = key_range(p, b);
  const int n_keys = max(kr.hi - kr.lo, 0);
  const int per_split = ((n_keys + S - 1) / S + C::TN - 1) / C::TN * C::TN;
  const int s_lo = kr.lo + split * per_split;
  const int s_hi = min(kr.hi, s_lo + per_split);
  const int ntiles = s_hi > s_lo ? (s_hi - s_lo + C::TN - 1) / C::TN : 0;

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_sb + kvh * p.k_sh;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_sb + kvh * p.v_sh;

  // Each thread copies TN * CH / kThreads 16-byte chunks of K and of V per tile.
  auto load_tile = [&](int t, int stage) {
    const int j0 = s_lo + t * C::TN;
    for (int e = tid; e < C::TN * C::CH; e += kThreads) {
      const int j = e / C::CH, c = e % C::CH;
      const int key = j0 + j;
      const bool ok = key < s_hi;
      const int64_t kk = ok ? key : 0;
      cp_async16(&sm.u.tiles.k[stage][j * C::ROW_BYTES + c * 16], kbase + kk * p.k_sn + c * kVec, ok);
      cp_async16(&sm.u.tiles.v[stage][j * C::ROW_BYTES + c * 16], vbase + kk * p.v_sn + c * kVec, ok);
    }
    cp_async_commit();
  };
  if (ntiles > 0) load_tile(0, 0);

  // q rows into shared memory, pre-scaled to the base-2 domain.
  const float qscale = p.scale * kLog2e;
  for (int e = tid; e < ROWS * D; e += kThreads) {
    const int r = e / D, d = e % D;
    float x = 0.f;
    if (r < nrows) {
      const int gr = row0 + r;
      const int h = kvh * G + gr / p.Nq, qi = gr % p.Nq;
      x = to_float(static_cast<const T*>(p.q)[b * p.q_sb + h * p.q_sh + qi * p.q_sn + d]) * qscale;
    }
    sm.q[r][d] = x;
  }

  float m_run[RPW], l_run[RPW];  // phase-B state of this warp's rows (same in every lane)
#pragma unroll
  for (int k = 0; k < RPW; ++k) {
    m_run[k] = -INFINITY;
    l_run[k] = 0.f;
  }
  float acc[ROWS][kVec];  // phase-C accumulators: rows x this thread's 8 dims
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int i = 0; i < kVec; ++i) acc[r][i] = 0.f;

  for (int t = 0; t < ntiles; ++t) {
    const int stage = t & 1;
    const int j0 = s_lo + t * C::TN;
    if (t + 1 < ntiles) {
      load_tile(t + 1, stage ^ 1);  // overlaps the copy of tile t + 1 with the math of tile t
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    if (tid < C::TN) {
      const int key = j0 + tid;
      bool ok = key < s_hi;
      if (ok && p.kpm) ok = p.kpm[b * p.m_sb + static_cast<int64_t>(key) * p.m_sn] != 0;
      sm.kvalid[tid] = ok;
    }
    __syncthreads();

    // A. partial scores: thread = (key j, dims [dp * DP, (dp + 1) * DP)), all rows.
    {
      const int j = tid % C::TN, dp = tid / C::TN;
      const unsigned char* krow = &sm.u.tiles.k[stage][j * C::ROW_BYTES];
      float s[ROWS];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s[r] = 0.f;
#pragma unroll
      for (int c = 0; c < C::DP / kVec; ++c) {
        const int d0 = dp * C::DP + c * kVec;
        float kf[kVec];
        unpack8<T>(*reinterpret_cast<const uint4*>(krow + d0 * 2), kf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float4 qa = *reinterpret_cast<const float4*>(&sm.q[r][d0]);
          const float4 qb = *reinterpret_cast<const float4*>(&sm.q[r][d0 + 4]);
          s[r] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] +
                  qb.x * kf[4] + qb.y * kf[5] + qb.z * kf[6] + qb.w * kf[7];
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) sm.part[dp][r][j] = s[r];
    }
    __syncthreads();

    // B. online softmax: warp w owns rows w, w + kWarps, ...; lane owns keys lane, lane + 32.
#pragma unroll
    for (int k = 0; k < RPW; ++k) {
      const int r = warp + k * kWarps;
      if (r >= ROWS) continue;  // warp-uniform
      const int pos = kr.shift + (row0 + r) % p.Nq;  // this row's key position
      float sv[C::JPL];
      float tmax = -INFINITY;
#pragma unroll
      for (int u = 0; u < C::JPL; ++u) {
        const int j = lane + 32 * u;
        float x = -INFINITY;
        if (j < C::TN && r < nrows && sm.kvalid[j]) {
          const int key = j0 + j;
          const bool in_window = (p.window_left < 0 || key >= pos - p.window_left) &&
                                 (p.window_right < 0 || key <= pos + p.window_right);
          if (in_window) {
            x = 0.f;
#pragma unroll
            for (int dp = 0; dp < C::NDP; ++dp) x += sm.part[dp][r][j];
          }
        }
        sv[u] = x;
        tmax = fmaxf(tmax, x);
      }
      tmax = group_max<32>(tmax);
      const float m_new = fmaxf(m_run[k], tmax);
      // While no key has been visible, m_new = -inf: use 0 as the reference so that every
      // exponential is exp2(-inf) = 0 rather than exp2(-inf + inf) = NaN.
      const float ref = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m_run[k] - ref);
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < C::JPL; ++u) {
        const int j = lane + 32 * u;
        const float pj = exp2f(sv[u] - ref);
        if (j < C::TN) sm.p[r][j] = pj;
        psum += pj;
      }
      psum = group_sum<32>(psum);
      l_run[k] = l_run[k] * alpha + psum;
      m_run[k] = m_new;
      if (lane == 0) sm.alpha[r] = alpha;
    }
    __syncthreads();

    // C. acc[r, chunk c] = alpha_r * acc + sum over this thread's keys of p[r, j] * v_j[chunk c].
    {
      const int c = tid % C::CH, ks = tid / C::CH;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float a = sm.alpha[r];
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[r][i] *= a;
      }
#pragma unroll
      for (int jj = 0; jj < C::TN / C::KS; ++jj) {
        const int j = ks + jj * C::KS;
        // Padded / out-of-range keys are skipped, not multiplied by p = 0: their V rows may
        // hold anything (an uninitialised cache slot can be NaN, and 0 * NaN = NaN).
        if (!sm.kvalid[j]) continue;
        float vf[kVec];
        unpack8<T>(*reinterpret_cast<const uint4*>(&sm.u.tiles.v[stage][j * C::ROW_BYTES + c * 16]), vf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float pr = sm.p[r][j];
#pragma unroll
          for (int i = 0; i < kVec; ++i) acc[r][i] = fmaf(pr, vf[i], acc[r][i]);
        }
      }
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

  // Reduce the per-slice accumulators (the tile buffers are free now: every copy has landed).
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < RPW; ++k) {
      const int r = warp + k * kWarps;
      if (r < ROWS) {
        sm.m[r] = m_run[k];
        sm.l[r] = l_run[k];
      }
    }
  }
  {
    const int c = tid % C::CH, ks = tid / C::CH;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float4* dst = reinterpret_cast<float4*>(&sm.u.red[ks][r][c * kVec]);
      dst[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
      dst[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    }
  }
  __syncthreads();

  for (int e = tid; e < nrows * D; e += kThreads) {
    const int r = e / D, d = e % D;
    float sum = 0.f;
#pragma unroll
    for (int ks = 0; ks < C::KS; ++ks) sum += sm.u.red[ks][r][d];
    const float l = sm.l[r];
    const float o = l > 0.f ? sum / l : 0.f;
    const float lse2 = l > 0.f ? sm.m[r] + log2f(l) : -INFINITY;
    const int gr = row0 + r;
    const int h = kvh * G + gr / p.Nq, qi = gr % p.Nq;
    const int64_t row = (static_cast<int64_t>(b) * p.Hq + h) * p.Nq + qi;  // [B, Hq, Nq]
    if (S == 1) {
      static_cast<T*>(p.o)[row * D + d] = from_float<T>(o);
      if (d == 0) p.lse[row] = lse2 * kLn2;
    } else {
      p.o_ws[(row * S + split) * D + d] = o;
      if (d == 0) p.lse_ws[row * S + split] = lse2;
    }
  }
}

// One block per (b, h, i) row: weights w_s = exp2(lse_s - max) over the splits.
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeParams p) {
  __shared__ float w[kMaxSplits];
  __shared__ float stats[2];  // max, sum of weights
  const int S = p.num_splits, D = p.D;
  const int64_t row = blockIdx.x;
  for (int s = threadIdx.x; s < S; s += blockDim.x) w[s] = p.lse_ws[row * S + s];
  __syncthreads();
  if (threadIdx.x == 0) {
    float mx = -INFINITY;
    for (int s = 0; s < S; ++s) mx = fmaxf(mx, w[s]);
    stats[0] = mx;
  }
  __syncthreads();
  const float mx = stats[0];
  if (mx == -INFINITY) {  // no split saw a key: o = 0, lse = -inf
    for (int d = threadIdx.x; d < D; d += blockDim.x) static_cast<T*>(p.o)[row * D + d] = from_float<T>(0.f);
    if (threadIdx.x == 0) p.lse[row] = -INFINITY;
    return;
  }
  __syncthreads();  // everyone has read stats[0] before w is overwritten
  for (int s = threadIdx.x; s < S; s += blockDim.x) w[s] = exp2f(w[s] - mx);
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int s = 0; s < S; ++s) sum += w[s];
    stats[1] = sum;
  }
  __syncthreads();
  const float inv = 1.f / stats[1];
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < S; ++s) {
      if (w[s] > 0.f) o = fmaf(w[s], p.o_ws[(row * S + s) * D + d], o);  // empty splits hold o = 0
    }
    static_cast<T*>(p.o)[row * D + d] = from_float<T>(o * inv);
  }
  if (threadIdx.x == 0) p.lse[row] = (mx + log2f(stats[1])) * kLn2;
}

int rows_per_block(int rows) { return rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8; }

template <typename T, int D, int ROWS>
const void* split_kernel_ptr() {
  return reinterpret_cast<const void*>(&decode_split_kernel<T, D, ROWS>);
}

template <typename T>
const void* pick_split_kernel(int D, int rows) {
  const int R = rows_per_block(rows);
#define ATTNKIT_CASE(DD, RR) \
  if (D == DD && R == RR) return split_kernel_ptr<T, DD, RR>();
#define ATTNKIT_ROWS(DD) ATTNKIT_CASE(DD, 1) ATTNKIT_CASE(DD, 2) ATTNKIT_CASE(DD, 4) ATTNKIT_CASE(DD, 8)
  ATTNKIT_ROWS(64)
  ATTNKIT_ROWS(128)
  ATTNKIT_ROWS(256)
#undef ATTNKIT_ROWS
#undef ATTNKIT_CASE
  return nullptr;
}

const void* split_kernel_for(const DecodeParams& p, DType dtype) {
  const int rows = (p.Hq / p.Hkv) * p.Nq;
  return dtype == DType::kFloat16 ? pick_split_kernel<__half>(p.D, rows)
                                  : pick_split_kernel<__nv_bfloat16>(p.D, rows);
}

int row_groups(const DecodeParams& p) {
  const int rows = (p.Hq / p.Hkv) * p.Nq;
  return (rows + 7) / 8;  // > 1 only when the block takes 8 rows
}

}  // namespace

int decode_attention_num_splits(const DecodeParams& p, DType dtype, int requested) {
  if (requested > 0) return requested < kMaxSplits ? requested : kMaxSplits;
  const void* kernel = split_kernel_for(p, dtype);
  if (!kernel) return 1;
  // Fill the GPU in ONE wave: splits = resident blocks / blocks without splitting (rounded
  // down, so a split-KV grid never spills a nearly empty second wave), and keep >= 256 keys
  // per split so the merge stays negligible.
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0) != cudaSuccess ||
      per_sm < 1) {
    (void)cudaGetLastError();
    per_sm = 1;
  }
  const int64_t base = static_cast<int64_t>(p.B) * p.Hkv * row_groups(p);
  const int64_t resident = static_cast<int64_t>(per_sm) * device_sm_count();
  int64_t s = base > 0 ? resident / base : 1;
  const int64_t by_len = (static_cast<int64_t>(p.Nk) + 255) / 256;
  if (s > by_len) s = by_len;
  if (s > kMaxSplits) s = kMaxSplits;
  return s < 1 ? 1 : static_cast<int>(s);
}

cudaError_t decode_attention_launch(const DecodeParams& p, DType dtype, cudaStream_t stream) {
  if (p.B == 0 || p.Hq == 0 || p.Nq == 0) return cudaSuccess;
  if (p.num_splits < 1 || p.num_splits > kMaxSplits || p.Hkv < 1 || p.Hq % p.Hkv != 0) {
    return cudaErrorInvalidValue;
  }
  const void* kernel = split_kernel_for(p, dtype);
  if (!kernel) return cudaErrorInvalidValue;  // unsupported head dim
  const dim3 grid(p.num_splits, p.Hkv * row_groups(p), p.B);
  if (grid.y > 65535u || grid.z > 65535u) return cudaErrorInvalidConfiguration;
  DecodeParams args = p;
  void* kargs[] = {&args};
  cudaError_t err = cudaLaunchKernel(kernel, grid, dim3(kThreads), kargs, 0, stream);
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int64_t rows = static_cast<int64_t>(p.B) * p.Hq * p.Nq;
  if (rows > 0x7fffffff) return cudaErrorInvalidConfiguration;
  if (dtype == DType::kFloat16) {
    decode_merge_kernel<__half><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p);
  } else {
    decode_merge_kernel<__nv_bfloat16><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace attnkit
