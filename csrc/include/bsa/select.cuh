// Block selection (SPEC §2) in three launches, none of which synchronises with the host
// (run_select; run_rank is the last two alone, for pooled inputs the caller made):
//   1. pool_kernel: mean of the valid tokens of every q and k block, read in place from
//      the THW tensors with 16-byte loads, fp32 sums, into [B, H, N, D] fp32 workspaces;
//   2. score_kernel: s = q_pooled . k_pooled^T, fp32-accurate on tensor cores (3xTF32);
//   2+3. top-k rows that fit in shared memory (nearly all; api.h select_fused_applies) take
//      topk_fused_kernel instead: the same scores, kept on chip, and topk_in_runs per row;
//   1+2+3. where also block capacities are multiples of 4 and two 97 KB CTAs fit on an SM
//      (api.h select_pooled_applies; H100), run_select makes all of it one launch,
//      topk_pooled_kernel: ranking CTAs start per head as soon as its pooling is done;
//   3. one chooser finds the cdf count and the exact top-k over order-preserving uint32 keys,
//      ties to the smaller id: choose_warp_kernel (a warp per query block, keys in registers:
//      short rows and cdf rows up to 4096), choose_row_kernel (a warp per query block, keys in
//      shared memory: top-k rows up to 1408) or choose_kernel (a CTA per query block: longer rows).
// Written order: the chosen ids in ASCENDING block id (consecutive K/V blocks are then
// near each other in memory, which helps L2 in the forward); entries past the count are -1.
#pragma once

#include <algorithm>
#include <cmath>

#include "bsa/api.h"
#include "bsa/params.h"
#include "bsa/ptx.cuh"

namespace bsa {
namespace sel {

constexpr int kPoolThreads = 128;
constexpr int kPoolUnroll = 4;  // 16-byte loads in flight per thread
constexpr int kMaxPoolCapacity = 256;   // block capacity bound, checked by the binding

template <DType kDType, int kHeadDim>
__global__ void __launch_bounds__(kPoolThreads) pool_kernel(const SelectParams p) {
  using Element = typename ElementOf<kDType>::type;
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kGroups = kPoolThreads / kChunks;  // rows read concurrently by the CTA
  __shared__ float partial[kGroups][kHeadDim];
  __shared__ RowCoord rows[kMaxPoolCapacity];

  const int nq = p.geom_q.num_blocks();
  const bool is_q = static_cast<int>(blockIdx.x) < nq;
  const int blk = is_q ? blockIdx.x : blockIdx.x - nq;
  const Geometry& geom = is_q ? p.geom_q : p.geom_k;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const Element* base = is_q ? static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride
                             : static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const int64_t row_stride = is_q ? p.q_row_stride : p.k_row_stride;
  const BlockOrigin o = block_origin(geom, blk);
  const int cap = geom.capacity();

  const int tid = threadIdx.x, ch = tid % kChunks, grp = tid / kChunks;
  for (int r = tid; r < cap; r += kPoolThreads) rows[r] = row_coord(geom, r);
  __syncthreads();
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;

  for (int r0 = grp; r0 < cap; r0 += kGroups * kPoolUnroll) {
    int4 raw[kPoolUnroll];
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      const int r = r0 + u * kGroups;
      raw[u] = make_int4(0, 0, 0, 0);
      if (r < cap) {
        const RowCoord rc = rows[r];
        if (o.full || row_inside(o, rc.packed))
          raw[u] = __ldg(reinterpret_cast<const int4*>(base + static_cast<int64_t>(o.token + rc.offset) * row_stride +
                                                       ch * 8));
      }
    }
#pragma unroll
    for (int u = 0; u < kPoolUnroll; ++u) {
      const uint32_t* x = reinterpret_cast<const uint32_t*>(&raw[u]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = ElementOf<kDType>::unpack(x[e]);
        acc[2 * e] += f.x;
        acc[2 * e + 1] += f.y;
      }
    }
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) partial[grp][ch * 8 + e] = acc[e];
  __syncthreads();

  if (tid < kHeadDim) {
    float sum = 0.f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) sum += partial[gi][tid];
    const int valid = valid_rows(geom, o);
    float* dst = is_q ? p.q_pooled + (static_cast<int64_t>(bh) * nq + blk) * kHeadDim
                      : p.k_pooled + (static_cast<int64_t>(bh) * p.geom_k.num_blocks() + blk) * kHeadDim;
    dst[tid] = sum / static_cast<float>(valid);
  }
}

// Scores on tensor cores with fp32 accuracy (3xTF32): each fp32 operand x is split into
// big = tf32(x) and small = tf32(x - big) (k by split_tf32_fast, truncating: two instructions
// instead of seven); big*big + big*small + small*big keeps ~21 mantissa bits per product, so
// selections agree with an fp32 SIMT dot product up to rounding.
// 128x128 tile per CTA, 8 warps as 2 (query) x 4 (key), 64x32 per warp of m16n8k8 tiles.
// The head dim streams through two cp.async stages of 16 floats.
constexpr int kTile = 128;
constexpr int kSlice = 16;
constexpr int kSlicePitch = kSlice + 4;  // rows 20 floats apart: fragment loads are conflict-free
constexpr int kScoreThreads = 256;

__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

// D (16x8 fp32) += A (16x8 tf32, row) * B (8x8 tf32, col).
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void split_tf32(float x, uint32_t& big, uint32_t& small) {
  big = to_tf32(x);
  small = to_tf32(x - __uint_as_float(big));
}

// The same split in two instructions instead of seven (cvt.rna.tf32 is three on sm_80/sm_90):
// big = x with its low 13 bits cleared (truncated, so exact), small = x - big (exact in fp32),
// passed as is: the tensor cores read a TF32 operand's top 19 bits, truncating small's low
// ones. Products keep ~21 bits instead of ~22; big*big + big*small + small*big as before.
__device__ __forceinline__ void split_tf32_fast(float x, uint32_t& big, uint32_t& small) {
  big = __float_as_uint(x) & 0xffffe000u;
  small = __float_as_uint(x - __uint_as_float(big));
}

template <int kHeadDim>
__global__ void __launch_bounds__(kScoreThreads, 2) score_kernel(const SelectParams p) {
  __shared__ __align__(16) float sa[2][kTile][kSlicePitch];  // [stage][query block][d]
  __shared__ __align__(16) float sb[2][kTile][kSlicePitch];  // [stage][key block][d]
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int bh = blockIdx.z;
  const int q0 = blockIdx.y * kTile, k0 = blockIdx.x * kTile;
  const float* qa = p.q_pooled + static_cast<int64_t>(bh) * nq * kHeadDim;
  const float* kb = p.k_pooled + static_cast<int64_t>(bh) * nk * kHeadDim;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4, g = lane / 4, t = lane % 4;

  // Each thread copies 16 bytes of two rows of each operand per stage; rows past N read nothing.
  auto load = [&](int stage, int d0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = tid / 4 + 64 * h, c = (tid % 4) * 4;
      const int qi = min(q0 + row, nq - 1), kj = min(k0 + row, nk - 1);
      cp_async_16(&sa[stage][row][c], qa + static_cast<int64_t>(qi) * kHeadDim + d0 + c, q0 + row < nq ? 16 : 0);
      cp_async_16(&sb[stage][row][c], kb + static_cast<int64_t>(kj) * kHeadDim + d0 + c, k0 + row < nk ? 16 : 0);
    }
    cp_async_commit();
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  constexpr int kSlices = kHeadDim / kSlice;
  load(0, 0);
#pragma unroll 1
  for (int sl = 0; sl < kSlices; ++sl) {
    const int stage = sl & 1;
    if (sl + 1 < kSlices) {
      load(stage ^ 1, (sl + 1) * kSlice);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kSlice; ks += 8) {
      uint32_t a_big[4][4], a_small[4][4], b_big[4][2], b_small[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int r = wm * 64 + mt * 16 + g;
        split_tf32(sa[stage][r][ks + t], a_big[mt][0], a_small[mt][0]);
        split_tf32(sa[stage][r + 8][ks + t], a_big[mt][1], a_small[mt][1]);
        split_tf32(sa[stage][r][ks + t + 4], a_big[mt][2], a_small[mt][2]);
        split_tf32(sa[stage][r + 8][ks + t + 4], a_big[mt][3], a_small[mt][3]);
      }
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int n = wn * 32 + nt * 8 + g;
        split_tf32_fast(sb[stage][n][ks + t], b_big[nt][0], b_small[nt][0]);
        split_tf32_fast(sb[stage][n][ks + t + 4], b_big[nt][1], b_small[nt][1]);
      }
      // Small cross terms first: they are added before the big product swamps them.
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          mma_1688_tf32(acc[mt][nt], a_small[mt], b_big[nt]);
          mma_1688_tf32(acc[mt][nt], a_big[mt], b_small[nt]);
          mma_1688_tf32(acc[mt][nt], a_big[mt], b_big[nt]);
        }
    }
    // The stage just read is refilled by the next iteration's load, issued after this barrier.
    __syncthreads();
  }

  float* out = p.scores + static_cast<int64_t>(bh) * nq * nk;
  const bool pairs = (nk % 2) == 0;  // float2 stores stay 8-byte aligned only for even rows
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int qi = q0 + wm * 64 + mt * 16 + g + 8 * hr;
      if (qi >= nq) continue;
      float* orow = out + static_cast<int64_t>(qi) * nk;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        const int kj = k0 + wn * 32 + nt * 8 + 2 * t;
        const float x = acc[mt][nt][2 * hr], y = acc[mt][nt][2 * hr + 1];
        if (pairs && kj + 1 < nk) {
          *reinterpret_cast<float2*>(orow + kj) = make_float2(x, y);
        } else {
          if (kj < nk) orow[kj] = x;
          if (kj + 1 < nk) orow[kj + 1] = y;
        }
      }
    }
}

constexpr int kChooseThreads = 256;
constexpr int kChooseWarps = kChooseThreads / 32;

__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f == 0.f ? 0.f : f);  // -0 and +0 tie, so the smaller id wins
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_value(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Deterministic block sums: fixed per-thread order, fixed shuffle tree, fixed warp order.
// `slot` alternates between calls so one barrier per reduction suffices.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T (*scratch)[kChooseWarps], int& slot) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  if ((threadIdx.x & 31) == 0) scratch[slot][threadIdx.x >> 5] = v;
  __syncthreads();
  T total = 0;
#pragma unroll
  for (int w = 0; w < kChooseWarps; ++w) total += scratch[slot][w];
  slot ^= 1;
  return total;
}

__device__ __forceinline__ uint32_t block_max(uint32_t v, uint32_t (*scratch)[kChooseWarps], int& slot) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, off));
  if ((threadIdx.x & 31) == 0) scratch[slot][threadIdx.x >> 5] = v;
  __syncthreads();
  uint32_t total = 0;
#pragma unroll
  for (int w = 0; w < kChooseWarps; ++w) total = max(total, scratch[slot][w]);
  slot ^= 1;
  return total;
}

// Lane l owns bins 255-8l .. 248-8l; returns the bin holding `rank` (1 = largest key) and, in
// `above`, the keys in the bins above it. Every lane gets the same answer.
__device__ __forceinline__ int warp_pick_bin(const int* hist, int rank, int lane, int& above) {
  int local[8], sum = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += (local[i] = hist[255 - 8 * lane - i]);
  int incl = sum;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int t = __shfl_up_sync(0xffffffff, incl, off);
    if (lane >= off) incl += t;
  }
  int acc = incl - sum, bin = -1;
  if (acc < rank && rank <= incl) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (bin < 0 && acc + local[i] >= rank) bin = 255 - 8 * lane - i;
      if (bin < 0) acc += local[i];
    }
  }
  const int owner = __ffs(__ballot_sync(0xffffffff, bin >= 0)) - 1;
  above = __shfl_sync(0xffffffff, acc, owner);
  return __shfl_sync(0xffffffff, bin, owner);
}

// The key of rank `rank` (1 = largest) among a warp's n_cand candidates in shared memory
// (1 <= rank <= n_cand), found by ranking every candidate against all others; every lane gets it.
__device__ __forceinline__ uint32_t rank_candidates(const uint32_t* cand, int n_cand, int rank, int lane) {
  bool mine = false;
  uint32_t value = 0;
  for (int c = lane; c < n_cand; c += 32) {
    const uint32_t v = cand[c];
    int gt = 0, ge = 0;
    for (int i = 0; i < n_cand; ++i) gt += cand[i] > v, ge += cand[i] >= v;
    if (gt < rank && rank <= ge) mine = true, value = v;
  }
  const int owner = __ffs(__ballot_sync(0xffffffff, mine)) - 1;
  return __shfl_sync(0xffffffff, value, owner);
}

template <int kHeadDim>
__global__ void __launch_bounds__(kChooseThreads) choose_kernel(const SelectParams p) {
  extern __shared__ uint32_t keys[];  // [nk] order-preserving keys of this row's scores
  __shared__ int iscratch[2][kChooseWarps];
  __shared__ float fscratch[2][kChooseWarps];
  __shared__ uint32_t uscratch[2][kChooseWarps];
  __shared__ uint32_t warp_total[kChooseWarps];
  __shared__ int hist[256];
  __shared__ int picked[2];  // digit chosen by this radix pass, keys above it
  static_assert(kChooseThreads == 256, "one histogram bin per thread");
  int islot = 0, fslot = 0, uslot = 0;

  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int64_t row = static_cast<int64_t>(blockIdx.y) * nq + blockIdx.x;
  const float* s = p.scores + row * nk;
  const int tid = threadIdx.x;
  for (int j = tid; j < nk; j += kChooseThreads) keys[j] = order_key(s[j]);
  __syncthreads();

  int count = p.topk;
  if (p.cdf_threshold > 0.f) {
    // p_j = exp2((s_j - max) * D^-0.5 * log2 e) / sum; compare unnormalised mass to thr * sum.
    const float coef = rsqrtf(static_cast<float>(kHeadDim)) * 1.4426950408889634f;
    uint32_t mk = 0;
    for (int j = tid; j < nk; j += kChooseThreads) mk = max(mk, keys[j]);
    const float smax = key_value(block_max(mk, uscratch, uslot));
    float part = 0.f;
    for (int j = tid; j < nk; j += kChooseThreads) part += exp2f((key_value(keys[j]) - smax) * coef);
    const float total = block_sum(part, fscratch, fslot);
    const float target = p.cdf_threshold * total;
    int n_cdf = nk;
    if (total >= target) {
      // Largest key x with mass(key >= x) >= target: the score at which the cdf crosses.
      uint32_t x = 0;
      for (int bit = 31; bit >= 0; --bit) {
        const uint32_t cand = x | (1u << bit);
        float m = 0.f;
        for (int j = tid; j < nk; j += kChooseThreads)
          if (keys[j] >= cand) m += exp2f((key_value(keys[j]) - smax) * coef);
        if (block_sum(m, fscratch, fslot) >= target) x = cand;
      }
      float above = 0.f;
      int n_above = 0, n_equal = 0;
      for (int j = tid; j < nk; j += kChooseThreads) {
        if (keys[j] > x) above += exp2f((key_value(keys[j]) - smax) * coef), ++n_above;
        if (keys[j] == x) ++n_equal;
      }
      above = block_sum(above, fscratch, fslot);
      n_above = block_sum(n_above, iscratch, islot);
      n_equal = block_sum(n_equal, iscratch, islot);
      // Equal scores carry equal mass: add them one at a time until the target is met.
      const float px = exp2f((key_value(x) - smax) * coef);
      n_cdf = n_above;
      float acc = above;
      do {
        ++n_cdf;
        acc += px;
      } while (acc < target && n_cdf < n_above + n_equal);
    }
    count = max(count, n_cdf);
  }
  count = min(min(count, p.width), nk);
  count = max(count, 0);

  int32_t* out = p.indices + row * p.width;
  if (count > 0) {
    // K-th largest key by radix select, 8 bits per pass from the top: each pass histograms the
    // next digit of the keys that share the digits chosen so far (256 bins, one per thread).
    uint32_t x = 0, mask = 0;
    int rank = count;  // wanted rank among the keys matching x on `mask` (1 = largest)
    for (int shift = 24; shift >= 0; shift -= 8) {
      hist[tid] = 0;
      __syncthreads();
      for (int j = tid; j < nk; j += kChooseThreads) {
        const uint32_t kj = keys[j];
        if ((kj & mask) == x) atomicAdd(&hist[(kj >> shift) & 255u], 1);
      }
      __syncthreads();
      if (tid < 32) {
        int above;
        const int digit = warp_pick_bin(hist, rank, tid, above);
        if (tid == 0) picked[0] = digit, picked[1] = above;
      }
      __syncthreads();
      x |= static_cast<uint32_t>(picked[0]) << shift;
      mask |= 255u << shift;
      rank -= picked[1];
    }
    // Compaction in id order: each thread owns a contiguous id range, ranks come from a scan.
    const int per = (nk + kChooseThreads - 1) / kChooseThreads;
    const int lo = min(nk, tid * per), hi = min(nk, lo + per);
    int n_gt = 0, n_eq = 0;
    for (int j = lo; j < hi; ++j) n_gt += keys[j] > x, n_eq += keys[j] == x;
    // Block-wide exclusive scan of both counts at once (packed 16:16; totals are <= Nk < 2^16).
    const uint32_t mine = static_cast<uint32_t>(n_gt) | (static_cast<uint32_t>(n_eq) << 16);
    uint32_t incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const uint32_t t = __shfl_up_sync(0xffffffff, incl, off);
      if ((tid & 31) >= off) incl += t;
    }
    if ((tid & 31) == 31) warp_total[tid >> 5] = incl;
    __syncthreads();
    uint32_t before = incl - mine, total = 0;
#pragma unroll
    for (int w = 0; w < kChooseWarps; ++w) {
      if (w < (tid >> 5)) before += warp_total[w];
      total += warp_total[w];
    }
    int before_gt = static_cast<int>(before & 0xffffu), before_eq = static_cast<int>(before >> 16);
    const int total_gt = static_cast<int>(total & 0xffffu);
    const int need_eq = count - total_gt;  // ties at x: the smallest ids win
    for (int j = lo; j < hi; ++j) {
      const uint32_t kj = keys[j];
      if (kj > x || (kj == x && before_eq < need_eq)) {
        out[before_gt + min(before_eq, need_eq)] = j;
        if (kj > x) ++before_gt;
      }
      if (kj == x) ++before_eq;
    }
  }
  for (int j = count + tid; j < p.width; j += kChooseThreads) out[j] = -1;
  if (tid == 0) p.counts[row] = count;
}


// One warp per query block, the row's keys in registers (lane l holds ids l, l+32, ...): no
// block barriers, and the bisections stop as soon as the answer is pinned down instead of
// walking all 32 bits. Needs Nk <= 32 * kPerLane; run_select picks where it is used.
constexpr int kWarpChooseThreads = 128;
constexpr int kWarpChooseWarps = kWarpChooseThreads / 32;

// Warp sum in a fixed butterfly: every lane gets the same bits, so decisions stay uniform.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  return v;
}

template <int kPerLane>
__device__ __forceinline__ int count_at_least(const uint32_t (&key)[kPerLane], uint32_t x) {
  int c = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) c += key[i] >= x;
  return __reduce_add_sync(0xffffffff, c);
}

// One 32-id step of a warp chooser's write in ascending id order: `sure` ids are taken, `tie`
// ids while fewer than need_eq ties have been taken (the smallest ids win).
__device__ __forceinline__ void write_step(bool sure, bool tie, int j, int need_eq, int lane, int32_t* out,
                                           int& written, int& eq_seen) {
  const uint32_t lt_mask = (1u << lane) - 1u;
  const uint32_t ties = __ballot_sync(0xffffffff, tie);
  const bool take = sure || (tie && eq_seen + __popc(ties & lt_mask) < need_eq);
  eq_seen += __popc(ties);
  const uint32_t taken = __ballot_sync(0xffffffff, take);
  if (take) out[written + __popc(taken & lt_mask)] = j;
  written += __popc(taken);
}

template <int kPerLane>
__global__ void __launch_bounds__(kWarpChooseThreads) choose_warp_kernel(const SelectParams p, float coef) {
  extern __shared__ float mass_rows[];  // cdf only: [warp][kPerLane * 32] unnormalised p_j
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpChooseWarps + warp;
  if (row >= static_cast<int64_t>(p.batch) * p.heads * nq) return;  // whole warps leave together
  const float* s = p.scores + row * nk;

  // Key 0 is below every real key (order_key maps -inf to 0x007fffff), so padding never counts.
  uint32_t key[kPerLane];
  uint32_t kmax = 0, kmin = 0xffffffffu;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int j = i * 32 + lane;
    key[i] = j < nk ? order_key(__ldcs(s + j)) : 0u;
    if (j < nk) kmax = max(kmax, key[i]), kmin = min(kmin, key[i]);
  }
  kmax = __reduce_max_sync(0xffffffff, kmax);
  kmin = __reduce_min_sync(0xffffffff, kmin);
  // Bits above the highest one where max and min differ are shared by every key of the row.
  const uint32_t diff = kmax ^ kmin;
  const int top = diff == 0 ? -1 : 31 - __clz(diff);
  const uint32_t prefix = top < 0 ? kmin : top == 31 ? 0u : (kmin & ~((2u << top) - 1u));

  int count = p.topk;
  if (p.cdf_threshold > 0.f) {
    float* mass = mass_rows + warp * kPerLane * 32;
    const float smax = key_value(kmax);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int j = i * 32 + lane;
      const float e = j < nk ? exp2f((key_value(key[i]) - smax) * coef) : 0.f;
      mass[i * 32 + lane] = e;
      part += e;
    }
    const float total = warp_sum(part);
    const float target = p.cdf_threshold * total;
    int n_cdf = nk;
    if (total >= target) {
      // Largest key x with mass(key >= x) >= target, bit by bit; [lo, upper) always holds x,
      // with c_lo keys at or above lo and c_hi at or above upper. One key left: it is x.
      uint32_t lo = prefix;
      int c_lo = nk, c_hi = 0;
      for (int bit = top; bit >= 0 && c_lo - c_hi > 1; --bit) {
        const uint32_t cand = lo | (1u << bit);
        float m = 0.f;
        int c = 0;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          if (key[i] >= cand) m += mass[i * 32 + lane], ++c;
        m = warp_sum(m);
        c = __reduce_add_sync(0xffffffff, c);
        if (m >= target) lo = cand, c_lo = c;
        else c_hi = c;
      }
      if (c_lo - c_hi == 1) {
        n_cdf = c_hi + 1;
      } else {
        // Equal scores at x (lo is x here) carry equal mass: add them one at a time.
        float above = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i)
          if (key[i] > lo) above += mass[i * 32 + lane];
        above = warp_sum(above);
        const float px = exp2f((key_value(lo) - smax) * coef);
        n_cdf = c_hi;
        float acc = above;
        do {
          ++n_cdf;
          acc += px;
        } while (acc < target && n_cdf < c_lo);
      }
    }
    count = max(count, n_cdf);
  }
  count = max(min(min(count, p.width), nk), 0);

  int32_t* out = p.indices + row * p.width;
  if (count > 0) {
    // Largest x with count(key >= x) >= count. Stop once exactly `count` keys are >= lo; else
    // all bits are resolved, lo is the count-th key and ties at it go to the smallest ids.
    uint32_t lo = prefix;
    int c_lo = nk;
    for (int bit = top; bit >= 0 && c_lo != count; --bit) {
      const uint32_t cand = lo | (1u << bit);
      const int c = count_at_least(key, cand);
      if (c >= count) lo = cand, c_lo = c;
    }
    const bool exact = c_lo == count;
    const int n_gt = exact ? count : (lo == 0xffffffffu ? 0 : count_at_least(key, lo + 1));
    const int need_eq = count - n_gt;
    int written = 0, eq_seen = 0;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      if (written == count) break;  // warp-uniform
      const int j = i * 32 + lane;
      const bool valid = j < nk;
      const bool sure = valid && (exact ? key[i] >= lo : key[i] > lo);
      const bool tie = valid && !exact && key[i] == lo;
      write_step(sure, tie, j, need_eq, lane, out, written, eq_seen);
    }
  }
  for (int j = count + lane; j < p.width; j += 32) out[j] = -1;
  if (lane == 0) p.counts[row] = count;
}

template <int kPerLane>
cudaError_t launch_choose_warp(const SelectParams& p, int rows, cudaStream_t stream) {
  const int smem = p.cdf_threshold > 0.f ? kWarpChooseWarps * kPerLane * 32 * static_cast<int>(sizeof(float)) : 0;
  auto kernel = choose_warp_kernel<kPerLane>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const float coef = rsqrtf(static_cast<float>(p.head_dim)) * 1.4426950408889634f;
  kernel<<<(rows + kWarpChooseWarps - 1) / kWarpChooseWarps, kWarpChooseThreads, smem, stream>>>(p, coef);
  return cudaGetLastError();
}

// Top-k rows of 769..1408 key blocks (too long for the register-resident warp chooser): one
// warp per query block, the row's keys in shared memory. A CTA per row (choose_kernel) spent
// most of its issue slots on per-warp overhead (barriers, block reductions) rather than on the
// keys: ncu on H100 showed it issue-bound at 3.4 instructions per cycle. Here every step is
// warp-synchronous.
// The count-th largest key x: a 256-bin histogram of the score VALUES over [min, max] (the bin
// map is monotone, so bins above the one holding rank `count` hold only larger keys), then the
// keys of that bin (few on real rows) ranked exactly against each other. Rows where the range
// is not finite, or whose bin holds more than kRowCandidates keys, take an 8-bit radix select.
constexpr int kRowWarps = 4;
constexpr int kRowCandidates = 128;

// One warp's shared memory in 32-bit words: keys [nk], hist [256], candidates, 16-byte aligned.
__host__ __device__ constexpr int row_chooser_words(int nk) { return (nk + 256 + kRowCandidates + 3) & ~3; }

template <int kUnused = 0>  // a template only so that every translation unit may define it
__global__ void __launch_bounds__(kRowWarps * 32) choose_row_kernel(const SelectParams p) {
  extern __shared__ uint32_t row_smem[];  // per warp: keys [nk], hist [256], candidates
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowWarps + warp;
  if (row >= static_cast<int64_t>(p.batch) * p.heads * nq) return;  // whole warps leave together
  uint32_t* keys = row_smem + warp * row_chooser_words(nk);
  int* hist = reinterpret_cast<int*>(keys + nk);
  uint32_t* cand = keys + nk + 256;
  const float* s = p.scores + row * nk;

  uint32_t kmax = 0, kmin = 0xffffffffu;
  for (int j = lane; j < nk; j += 32) {
    const uint32_t k = order_key(__ldcs(s + j));
    keys[j] = k;
    kmax = max(kmax, k);
    kmin = min(kmin, k);
  }
  kmax = __reduce_max_sync(0xffffffff, kmax);
  kmin = __reduce_min_sync(0xffffffff, kmin);
  const int count = max(min(min(p.topk, p.width), nk), 0);
  int32_t* out = p.indices + row * p.width;

  if (count > 0) {
    uint32_t x = 0;
    bool found = false;
    const float vlo = key_value(kmin), vhi = key_value(kmax);
    const float bins_per_unit = 256.f / (vhi - vlo);
    if (isfinite(vlo) && isfinite(vhi) && vhi > vlo && isfinite(bins_per_unit)) {
      auto bin_of = [&](uint32_t k) { return min(255, max(0, __float2int_rz((key_value(k) - vlo) * bins_per_unit))); };
#pragma unroll
      for (int i = 0; i < 8; ++i) hist[lane + 32 * i] = 0;
      __syncwarp();
      for (int j = lane; j < nk; j += 32) atomicAdd(&hist[bin_of(keys[j])], 1);
      __syncwarp();
      int above;
      const int bin = warp_pick_bin(hist, count, lane, above);
      const int rank = count - above;
      // The bin's keys, compacted in id order by ballots (no atomics).
      int n_cand = 0;
      for (int j0 = 0; j0 < nk; j0 += 32) {
        const int j = j0 + lane;
        const bool in = j < nk && bin_of(keys[j]) == bin;
        const uint32_t ballot = __ballot_sync(0xffffffff, in);
        const int pos = n_cand + __popc(ballot & ((1u << lane) - 1u));
        if (in && pos < kRowCandidates) cand[pos] = keys[j];
        n_cand += __popc(ballot);
      }
      __syncwarp();
      if (n_cand <= kRowCandidates) {
        x = rank_candidates(cand, n_cand, rank, lane);
        found = true;
      }
    }
    if (!found) {
      // Radix select, 8 bits per pass from the top, over the keys that share the digits so far.
      uint32_t mask = 0;
      int rank = count;
      for (int shift = 24; shift >= 0; shift -= 8) {
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 8; ++i) hist[lane + 32 * i] = 0;
        __syncwarp();
        for (int j = lane; j < nk; j += 32) {
          const uint32_t k = keys[j];
          if ((k & mask) == x) atomicAdd(&hist[(k >> shift) & 255u], 1);
        }
        __syncwarp();
        int above;
        const int digit = warp_pick_bin(hist, rank, lane, above);
        x |= static_cast<uint32_t>(digit) << shift;
        mask |= 255u << shift;
        rank -= above;
      }
    }
    // Keys above x all go; ties at x go to the smallest ids. Written in ascending id order.
    int n_gt = 0;
    for (int j = lane; j < nk; j += 32) n_gt += keys[j] > x;
    n_gt = __reduce_add_sync(0xffffffff, n_gt);
    const int need_eq = count - n_gt;
    int written = 0, eq_seen = 0;
    for (int j0 = 0; j0 < nk && written < count; j0 += 32) {
      const int j = j0 + lane;
      const uint32_t k = j < nk ? keys[j] : 0u;
      write_step(j < nk && k > x, j < nk && k == x, j, need_eq, lane, out, written, eq_seen);
    }
  }
  for (int j = count + lane; j < p.width; j += 32) out[j] = -1;
  if (lane == 0) p.counts[row] = count;
}

// The top `count` (>= 1) of a warp's row of keys held in contiguous runs: lane l holds ids
// l * per + i for i < per. Real keys are >= 1 and every other register holds 0 (the padding of
// the row, whose total is 32 * kPerLane - nk), so no pass needs to test which keys are real.
// Written to out[0, count) in ascending id order: the runs are in id order, so each lane writes
// its chosen ids after those of the lanes before it (an exclusive scan).
// The count-th key x: a 256-bin histogram of the score values over [min, max] (bins above x's
// hold only larger keys), then the keys of x's bin ranked exactly; where the range is not
// finite or the bin holds more than kRowCandidates keys, bisection over the key bits.
// Every pass is branch-free per key (selects, predicated stores, atomics whose result is
// unused): per-key branches cost more than the keys' arithmetic. hist (256 ints) and cand
// (kRowCandidates words) are the warp's scratch.
template <int kPerLane>
__device__ __forceinline__ void topk_in_runs(const uint32_t (&key)[kPerLane], int nk, int per, int count, int* hist,
                                             uint32_t* cand, int32_t* out, int lane) {
  const int j0 = lane * per;
  uint32_t kmax = 0, kmin_less1 = 0xffffffffu;  // min(key - 1): the padding wraps to the top
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) kmax = max(kmax, key[i]), kmin_less1 = min(kmin_less1, key[i] - 1u);
  kmax = __reduce_max_sync(0xffffffff, kmax);
  const uint32_t kmin = __reduce_min_sync(0xffffffff, kmin_less1) + 1u;

  uint32_t x = 0;  // the count-th largest key, or a bound with exactly `count` keys at or above it
  bool found = false;
  const float vlo = key_value(kmin), vhi = key_value(kmax);
  const float bins_per_unit = 256.f / (vhi - vlo);
  if (isfinite(vlo) && isfinite(vhi) && vhi > vlo && isfinite(bins_per_unit)) {
    // The padding's value is NaN, which lands in bin 0; its count is taken off below.
    auto bin_of = [&](uint32_t k) { return min(255, max(0, __float2int_rz((key_value(k) - vlo) * bins_per_unit))); };
    __syncwarp();  // the scratch may still be read for the warp's previous row
#pragma unroll
    for (int b = 0; b < 8; ++b) hist[lane + 32 * b] = 0;
    __syncwarp();
    uint32_t bins[(kPerLane + 3) / 4] = {};  // each key's bin, four to a register
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int b = bin_of(key[i]);
      bins[i / 4] |= static_cast<uint32_t>(b) << (8 * (i % 4));
      atomicAdd(&hist[b], 1);
    }
    __syncwarp();
    if (lane == 0) hist[0] -= 32 * kPerLane - nk;
    __syncwarp();
    int above;
    const int bin = warp_pick_bin(hist, count, lane, above);
    const int rank = count - above;
    // The bin's keys: a bit per register, then each lane stores its own after the lanes before.
    constexpr int kWords = (kPerLane + 31) / 32;
    uint32_t in_bin[kWords] = {};
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const bool in = ((bins[i / 4] >> (8 * (i % 4))) & 255u) == static_cast<uint32_t>(bin) && key[i] != 0u;
      in_bin[i / 32] |= static_cast<uint32_t>(in) << (i % 32);
    }
    int mine = 0;
#pragma unroll
    for (int w = 0; w < kWords; ++w) mine += __popc(in_bin[w]);
    int incl = mine;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int up = __shfl_up_sync(0xffffffff, incl, off);
      if (lane >= off) incl += up;
    }
    const int n_cand = __shfl_sync(0xffffffff, incl, 31);
    if (n_cand <= kRowCandidates) {
      int pos = incl - mine;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const uint32_t bit = (in_bin[i / 32] >> (i % 32)) & 1u;
        if (bit) cand[pos] = key[i];
        pos += static_cast<int>(bit);
      }
      __syncwarp();
      x = rank_candidates(cand, n_cand, rank, lane);
      found = true;
    }
  }
  if (!found) {
    // Bisection from the first bit where min and max differ (bounds are >= 1: no padding counts).
    const uint32_t diff = kmax ^ kmin;
    const int top = diff == 0 ? -1 : 31 - __clz(diff);
    uint32_t lo = top < 0 ? kmin : top == 31 ? 0u : (kmin & ~((2u << top) - 1u));
    int c_lo = nk;
    for (int bit = top; bit >= 0 && c_lo != count; --bit) {
      const uint32_t c_bound = lo | (1u << bit);
      const int c = count_at_least(key, c_bound);
      if (c >= count) lo = c_bound, c_lo = c;
    }
    x = lo;
  }

  // Keys above x all go, ties at x while the count lasts (the smallest ids first). Where the
  // bisection stopped at an exact bound, count - n_gt is every tie, so the same rule holds.
  // x >= 1, so the padding is never above it nor tied with it.
  int n_gt = 0, n_eq = 0;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) n_gt += key[i] > x, n_eq += key[i] == x;
  // Exclusive scan of both counts at once (16:16; counts are <= Nk < 2^16).
  const uint32_t mine = static_cast<uint32_t>(n_gt) | (static_cast<uint32_t>(n_eq) << 16);
  uint32_t incl = mine;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t up = __shfl_up_sync(0xffffffff, incl, off);
    if (lane >= off) incl += up;
  }
  const uint32_t before = incl - mine, total = __shfl_sync(0xffffffff, incl, 31);
  const int need_eq = count - static_cast<int>(total & 0xffffu);  // ties at x: the smallest ids win
  int eq_seen = static_cast<int>(before >> 16);
  int pos = static_cast<int>(before & 0xffffu) + min(eq_seen, need_eq);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    // Bitwise, not short-circuit: no branch per key.
    const int tie = static_cast<int>(key[i] == x);
    const int take = static_cast<int>(key[i] > x) | (tie & static_cast<int>(eq_seen < need_eq));
    if (take) out[pos] = j0 + i;
    pos += take;
    eq_seen += tie;
  }
}

// Top-k ranking with the scores kept on chip: a CTA scores 16 query blocks against all Nk
// key blocks (3xTF32 products as in score_kernel, q and k split by split_tf32_fast), stores
// them as order keys in shared memory and its warps then choose each row's top-k with the
// row's keys in registers (topk_in_runs). The score matrix never reaches global memory (its
// write and read were 0.45 GB at W720s).
// Scoring: the q rows are stored in fragment order (one 16-byte shared load per fragment) and
// split where they are used: stored pre-split, A took twice the shared-memory reads of the B
// fragments and the kernel was 1% slower (docs/PERF.md, session 10). Each warp walks its own
// groups of 16 key blocks with no barrier: it loads a group's B fragments straight from global
// memory (L2), 16 bytes per lane and load, all of them in flight at once, the first kFusedAhead
// of them during the previous group (two CTAs of eight warps per SM hide the rest; a whole
// second group in registers spilled at the 128 registers two CTAs allow). For that the
// products take the head dim in a permuted order (the same for q and k, so the dot products are
// the same sums, associated differently): k-steps 2i and 2i+1 read dims 16i + 4t .. 16i + 4t + 3
// of lane t's key, b0 and b1 of step 2i from the first two, of step 2i+1 from the last two.
constexpr int kFusedThreads = 256;
constexpr int kFusedWarps = kFusedThreads / 32;
constexpr int kFusedKeys = 16;  // key blocks per warp step: two n8 tiles
// 16-byte pieces of each key row of a warp's next group loaded while the current group is
// multiplied (of kHeadDim / 16): W720s selection 0.825 -> 0.780 ms on H100 with 4, the ranking
// alone unchanged (the one launch's ranking CTAs see the longer L2 latency of the pooling beside
// them); 6 spilled 56-64 bytes at 128 registers (docs/PERF.md, session 10).
constexpr int kFusedAhead = 4;
static_assert(kFusedWarps == 8 && kRowCandidates == 128, "api.h sizes the choosers' scratch for 8 warps");

// Head dim read by lane t as b0 of k-step s (b1 is the next one); the A fragments use the same map.
__device__ __forceinline__ int fused_dim(int s, int t) { return 16 * (s / 2) + 4 * t + 2 * (s % 2); }

// Pooled inputs are read through the non-coherent path (__ldg) where an earlier launch wrote
// them, and with plain (weak) loads where other CTAs of the same launch did: after the acquire of
// the head's counter (and a barrier) the memory model makes those writes visible to weak loads,
// which may still hit L1, where two CTAs of one head on an SM share the keys. (The pooled
// pointers are not __restrict__, and the kernel stores through others, so the compiler cannot
// turn these into non-coherent loads; the SASS shows LDG.E.)
template <bool kCoherent, typename T>
__device__ __forceinline__ T load_pooled(const T* ptr) {
  if constexpr (kCoherent) {
    return *ptr;
  } else {
    return __ldg(ptr);
  }
}

// One CTA's work of topk_fused_kernel: rows q0 .. q0 + 15 of (batch, head) bh.
template <int kHeadDim, int kPerLane, bool kCoherent>
__device__ __forceinline__ void topk_fused_rows(const SelectParams& p, int bh, int q0, uint32_t* fused_smem) {
  constexpr int kRows = kSelectFusedRows;
  constexpr int kMt = kRows / 16;
  constexpr int kSteps = kHeadDim / 8;  // k-steps of the m16n8k8 products
  constexpr int kVec = kHeadDim / 16;   // 16-byte loads per key row and lane
  float4* a_frag = reinterpret_cast<float4*>(fused_smem);  // [kSteps][kMt][lane], split when used
  uint32_t* keys = fused_smem + select_fused_scratch_bytes(kHeadDim) / 4;  // [kRows][pitch]

  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int pitch = (nk + 3) & ~3;
  const float* qa = p.q_pooled + static_cast<int64_t>(bh) * nq * kHeadDim;
  const float* kb = p.k_pooled + static_cast<int64_t>(bh) * nk * kHeadDim;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, g = lane / 4, t = lane % 4;

  for (int i = tid; i < kSteps * kMt * 32; i += kFusedThreads) {
    const int l = i % 32, mt = (i / 32) % kMt, ks = i / (32 * kMt);
    const int r = q0 + mt * 16 + l / 4, c = fused_dim(ks, l % 4);
    const float* row0 = qa + static_cast<int64_t>(r) * kHeadDim;
    const float* row8 = row0 + 8 * kHeadDim;
    const float x[4] = {r < nq ? load_pooled<kCoherent>(row0 + c) : 0.f,
                        r + 8 < nq ? load_pooled<kCoherent>(row8 + c) : 0.f,
                        r < nq ? load_pooled<kCoherent>(row0 + c + 1) : 0.f,
                        r + 8 < nq ? load_pooled<kCoherent>(row8 + c + 1) : 0.f};
    a_frag[(ks * kMt + mt) * 32 + l] = make_float4(x[0], x[1], x[2], x[3]);
  }
  __syncthreads();

  // Pieces i0 .. i1 - 1 of group u's B: lane (g, t) holds dims 16i + 4t .. +3 of key
  // 16u + 8nt + g as piece i (clamped to the last key; columns past Nk are computed and never
  // stored). The first kAhead pieces of the warp's next group are loaded while the current
  // group is multiplied, so that its first products do not wait for L2.
  constexpr int kAhead = kVec < kFusedAhead ? kVec : kFusedAhead;
  static_assert(kAhead >= 1, "at least one piece ahead");
  auto load_pieces = [&](float4 (&b)[2][kVec], int u, int i0, int i1) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      const int n = min(u * kFusedKeys + nt * 8 + g, nk - 1);
      const float4* src = reinterpret_cast<const float4*>(kb + static_cast<int64_t>(n) * kHeadDim) + t;
#pragma unroll
      for (int i = 0; i < kVec; ++i)
        if (i >= i0 && i < i1) b[nt][i] = load_pooled<kCoherent>(src + 4 * i);
    }
  };

  const int groups = (nk + kFusedKeys - 1) / kFusedKeys;
  float4 bnext[2][kVec];  // only pieces 0 .. kAhead - 1 are used
  if (warp < groups) load_pieces(bnext, warp, 0, kAhead);
#pragma unroll 1
  for (int u = warp; u < groups; u += kFusedWarps) {
    float4 bcur[2][kVec];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < kAhead; ++i) bcur[nt][i] = bnext[nt][i];
    load_pieces(bcur, u, kAhead, kVec);
    if (u + kFusedWarps < groups) load_pieces(bnext, u + kFusedWarps, 0, kAhead);
    float acc[kMt][2][4];
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t b_big[2][2], b_small[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float4 v = bcur[nt][ks / 2];
        split_tf32_fast(ks % 2 ? v.z : v.x, b_big[nt][0], b_small[nt][0]);
        split_tf32_fast(ks % 2 ? v.w : v.y, b_big[nt][1], b_small[nt][1]);
      }
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        const float4 av = a_frag[(ks * kMt + mt) * 32 + lane];
        uint32_t a_big[4], a_small[4];
        split_tf32_fast(av.x, a_big[0], a_small[0]);
        split_tf32_fast(av.y, a_big[1], a_small[1]);
        split_tf32_fast(av.z, a_big[2], a_small[2]);
        split_tf32_fast(av.w, a_big[3], a_small[3]);
        // The small cross terms first, then the big product (as in score_kernel).
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma_1688_tf32(acc[mt][nt], a_small, b_big[nt]);
          mma_1688_tf32(acc[mt][nt], a_big, b_small[nt]);
          mma_1688_tf32(acc[mt][nt], a_big, b_big[nt]);
        }
      }
    }
    // The group's scores, as order keys, into the rows (rows past Nq are computed and unused).
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        uint32_t* krow = keys + (mt * 16 + g + 8 * hr) * pitch;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int j = u * kFusedKeys + nt * 8 + 2 * t;
          // Real keys are >= 1 (only a NaN's can be 0): the chooser reads 0 as padding.
          const uint32_t kx = max(order_key(acc[mt][nt][2 * hr]), 1u), ky = max(order_key(acc[mt][nt][2 * hr + 1]), 1u);
          if (j + 1 < nk) {
            *reinterpret_cast<uint2*>(krow + j) = make_uint2(kx, ky);  // pitch and j even: 8-byte aligned
          } else if (j < nk) {
            krow[j] = kx;
          }
        }
      }
  }

  __syncthreads();

  // Choosing: each warp takes whole rows, a row's keys in registers in contiguous runs per lane.
  int* hist = reinterpret_cast<int*>(fused_smem) + warp * (256 + kRowCandidates);
  uint32_t* cand = reinterpret_cast<uint32_t*>(hist + 256);
  const int count = max(min(min(p.topk, p.width), nk), 0);
  const int per = (nk + 31) / 32, j0 = lane * per;
  for (int r = warp; r < kRows && q0 + r < nq; r += kFusedWarps) {
    const int64_t row = static_cast<int64_t>(bh) * nq + q0 + r;
    uint32_t key[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) key[i] = i < per && j0 + i < nk ? keys[r * pitch + j0 + i] : 0u;
    int32_t* out = p.indices + row * p.width;
    if (count > 0) topk_in_runs(key, nk, per, count, hist, cand, out, lane);
    for (int j = count + lane; j < p.width; j += 32) out[j] = -1;
    if (lane == 0) p.counts[row] = count;
  }
}

template <int kHeadDim, int kPerLane>
__global__ void __launch_bounds__(kFusedThreads, 2) topk_fused_kernel(const SelectParams p) {
  extern __shared__ __align__(16) uint32_t fused_smem[];
  topk_fused_rows<kHeadDim, kPerLane, false>(p, blockIdx.y, blockIdx.x * kSelectFusedRows, fused_smem);
}

template <int kHeadDim, int kPerLane>
cudaError_t launch_topk_fused(const SelectParams& p, cudaStream_t stream) {
  constexpr int kRows = kSelectFusedRows;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int smem = select_fused_smem_bytes(kHeadDim, nk);
  auto kernel = topk_fused_kernel<kHeadDim, kPerLane>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3((nq + kRows - 1) / kRows, p.batch * p.heads), kFusedThreads, smem, stream>>>(p);
  return cudaGetLastError();
}


// ---- One launch for pooling and top-k ranking (run_select where select_pooled_applies) ----
// Pooling is DRAM-bound and the fused ranking is bound by the tensor and integer pipes, so the two
// overlap when they share SMs, provided the pooling takes little of an SM: here every thread
// streams its own 16-byte pieces of block rows through a private ring of kSelectPoolDepth
// cp.async slots in shared memory (24 KB of rows in flight per warp, no registers held), with no
// barrier and no exchange between threads. A warp pools one unit: 32 / (D / 8) blocks of one kind
// (q or k) of one (batch, head), each lane summing 8 dims of one block over its rows in fp32.
// Units are claimed in (batch, head)-major order from a global counter; each finished unit
// increments its head's done counter (release), and a ranking CTA starts once its head's count
// is complete (acquire). The first `pool_ctas` CTAs only pool; a ranking CTA whose head's units
// are not all claimed yet pools too (claiming units in the same order) until they are, so every
// unit its head waits for is claimed by a warp that waits on nothing: no launch order or
// residency is assumed.
template <int kHeadDim>
struct PoolLayout {
  static constexpr int kChunks = kHeadDim / 8;       // lanes per row of a block (16 bytes each)
  static constexpr int kStreams = 32 / kChunks;      // blocks per unit (one per group of lanes)
  static __host__ __device__ int units(int n) { return (n + kStreams - 1) / kStreams; }
};

// A unit as one lane sees it: its block's rows and where its 8 sums go.
struct PoolLane {
  const char* base;     // the head's first row, at this lane's 8 dims
  int64_t stride;       // row stride in bytes
  BlockOrigin o;
  int cap, table;       // rows per block of this kind; its row table's first entry
  float* dst;           // this lane's 8 pooled dims; null where the unit has no block for it
  float valid;          // real rows of the block
  int bh;
};

template <DType kDType, int kHeadDim>
__device__ __forceinline__ PoolLane pool_lane(const SelectParams& p, int unit, int units_per_head, int lane) {
  using Element = typename ElementOf<kDType>::type;
  using L = PoolLayout<kHeadDim>;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int bh = unit / units_per_head, r = unit - bh * units_per_head;
  const bool is_q = r < L::units(nq);
  const int blk = (is_q ? r : r - L::units(nq)) * L::kStreams + lane / L::kChunks, n = is_q ? nq : nk;
  const Geometry& g = is_q ? p.geom_q : p.geom_k;
  const int b = bh / p.heads, h = bh - b * p.heads, ch = lane % L::kChunks;
  PoolLane u;
  const Element* head = is_q ? head_base<Element>(p.q, p.q_batch_stride, p.q_head_stride, b, h)
                             : head_base<Element>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  u.base = reinterpret_cast<const char*>(head + ch * 8);
  u.stride = (is_q ? p.q_row_stride : p.k_row_stride) * static_cast<int64_t>(sizeof(Element));
  u.o = block_origin(g, min(blk, n - 1));
  u.cap = g.capacity();
  u.table = is_q ? 0 : p.geom_q.capacity();
  u.dst = blk < n ? (is_q ? p.q_pooled : p.k_pooled) + (static_cast<int64_t>(bh) * n + blk) * kHeadDim + ch * 8 : nullptr;
  u.valid = static_cast<float>(valid_rows(g, u.o));
  u.bh = bh;
  return u;
}

// Pools claimed units until none is left or, for stop_bh >= 0, until that head is complete (as
// last seen when claiming). Called by whole warps; returns with no copy in flight. Rows go in
// batches of kSelectPoolBatch (block capacities are multiples of it where this path applies):
// one commit group, four independent copies and four rows summed per step, so that the latency
// chains of a row (table lookup -> address -> copy; wait -> load -> adds) overlap. A unit is
// claimed two units ahead of its use, so the atomic's round trip is never waited for.
template <DType kDType, int kHeadDim>
__device__ __forceinline__ void pool_units(const SelectParams& p, int units_per_head, int stop_bh, uint4* ring,
                                           const RowCoord* tables) {
  constexpr int kBatch = kSelectPoolBatch, kGroups = kSelectPoolDepth / kBatch;
  static_assert(kSelectPoolDepth % kBatch == 0, "the ring holds whole batches");
  int* claim_counter = p.pool_sync;
  int* done = p.pool_sync + 1;
  const int lane = threadIdx.x % 32;
  const int total = p.batch * p.heads * units_per_head;
  uint4* slots = ring + threadIdx.x;  // slot s at slots[s * kFusedThreads]: private to this thread

  // Lane 0's claim of a unit (total: none), started now and read (shuffled) a unit later. A
  // helper claims only while the counter has not passed its head (units go in head-major order,
  // so every unit of its head is then claimed by a running warp) and its head was not complete
  // when it last looked. Helpers that claimed later heads' units spent ranking slots on pooling
  // and spread the DRAM bandwidth over several heads at once (the first head was complete only
  // after ~0.1 ms at W720s; per-CTA timeline in docs/PERF.md, session 10).
  int seen = 0;
  const int head_end = (stop_bh + 1) * units_per_head;
  int last = stop_bh >= 0 && lane == 0 ? *reinterpret_cast<volatile int*>(claim_counter) - 1 : -1;
  auto start_claim = [&]() {
    int u = total;
    if (lane == 0 && (stop_bh < 0 || (seen < units_per_head && last < head_end))) {
      u = atomicAdd(claim_counter, 1);
      last = u;  // compared at the next claim, a unit later: the atomic's round trip is not waited for
      if (stop_bh >= 0) seen = *reinterpret_cast<volatile int*>(done + stop_bh);
    }
    return u;
  };
  auto take = [&](int raw) { return __shfl_sync(0xffffffffu, raw, 0); };

  const int u0 = take(start_claim());
  if (u0 >= total) return;
  PoolLane cur = pool_lane<kDType, kHeadDim>(p, u0, units_per_head, lane), nxt = cur;
  int u1 = take(start_claim());
  bool nxt_valid = u1 < total;
  if (nxt_valid) nxt = pool_lane<kDType, kHeadDim>(p, u1, units_per_head, lane);
  int pend = nxt_valid ? start_claim() : total;  // lane 0's claim after nxt, in flight

  bool issuing_nxt = false;
  int ri = 0, rc = 0, groups = 0, slot_i = 0, slot_c = 0;
  float acc[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[e] = 0.f;

  // Issues the next batch of rows (of cur, else of nxt), if any.
  auto issue = [&]() {
    if (!issuing_nxt && ri == cur.cap) {
      issuing_nxt = true;
      ri = 0;
    }
    if (issuing_nxt && (!nxt_valid || ri == nxt.cap)) return;  // a unit ahead already: wait
    // Field by field: a reference to either unit would put both in local memory.
    const bool n = issuing_nxt;
    const BlockOrigin o = n ? nxt.o : cur.o;
    const bool live = (n ? nxt.dst : cur.dst) != nullptr;
    const char* base = n ? nxt.base : cur.base;
    const int64_t stride = n ? nxt.stride : cur.stride;
    const RowCoord* table = tables + (n ? nxt.table : cur.table) + ri;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const RowCoord rcd = table[j];
      const bool real = live && (o.full || row_inside(o, rcd.packed));
      const char* src = base + static_cast<int64_t>(o.token + rcd.offset) * stride;
      cp_async_16(slots + (slot_i + j) * kFusedThreads, real ? src : base, real ? 16 : 0);
    }
    cp_async_commit();
    slot_i = slot_i + kBatch == kSelectPoolDepth ? 0 : slot_i + kBatch;
    ri += kBatch;
    ++groups;
  };

#pragma unroll 1
  for (int g = 0; g < kGroups; ++g) issue();
#pragma unroll 1
  for (;;) {
    // This batch is the oldest group in flight: all but the newest kGroups - 1 are done.
    if (groups >= kGroups) {
      cp_async_wait<kGroups - 1>();
    } else {
      cp_async_wait<0>();
    }
    --groups;
#pragma unroll
    for (int j = 0; j < kBatch; ++j) {
      const uint4 raw = slots[(slot_c + j) * kFusedThreads];
      const uint32_t x[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 f = ElementOf<kDType>::unpack(x[e]);
        acc[2 * e] += f.x;
        acc[2 * e + 1] += f.y;
      }
    }
    slot_c = slot_c + kBatch == kSelectPoolDepth ? 0 : slot_c + kBatch;
    rc += kBatch;
    if (rc == cur.cap) {
      if (cur.dst != nullptr) {
        float4* dst = reinterpret_cast<float4*>(cur.dst);
        dst[0] = make_float4(acc[0] / cur.valid, acc[1] / cur.valid, acc[2] / cur.valid, acc[3] / cur.valid);
        dst[1] = make_float4(acc[4] / cur.valid, acc[5] / cur.valid, acc[6] / cur.valid, acc[7] / cur.valid);
      }
      __syncwarp();  // orders the warp's sums before lane 0's release below
      if (lane == 0) red_release_gpu_add(done + cur.bh, 1);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[e] = 0.f;
      rc = 0;
      if (!nxt_valid) break;  // nothing in flight: only rows of cur or a valid nxt are issued
      if (!issuing_nxt) ri = 0;  // every row of cur was issued, none of nxt yet
      cur = nxt;
      issuing_nxt = false;
      const int u = take(pend);  // claimed a unit ago
      nxt_valid = u < total;
      if (nxt_valid) {
        nxt = pool_lane<kDType, kHeadDim>(p, u, units_per_head, lane);
        pend = start_claim();
      }
    }
    issue();
  }
}

template <DType kDType, int kHeadDim, int kPerLane>
__global__ void __launch_bounds__(kFusedThreads, 2) topk_pooled_kernel(const SelectParams p, int pool_ctas) {
  extern __shared__ __align__(16) uint32_t fused_smem[];
  using L = PoolLayout<kHeadDim>;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int units_per_head = L::units(nq) + L::units(nk);
  uint4* ring = reinterpret_cast<uint4*>(fused_smem);
  RowCoord* tables = reinterpret_cast<RowCoord*>(fused_smem + kSelectPoolRingBytes / 4);
  const int cap_q = p.geom_q.capacity(), cap_k = p.geom_k.capacity();
  init_row_tables(tables, tables + cap_q, p.geom_q, p.geom_k, cap_q, cap_k, threadIdx.x, kFusedThreads);
  __syncthreads();

  if (static_cast<int>(blockIdx.x) < pool_ctas) {
    pool_units<kDType, kHeadDim>(p, units_per_head, -1, ring, tables);
    return;
  }
  const int groups = (nq + kSelectFusedRows - 1) / kSelectFusedRows;
  const int item = blockIdx.x - pool_ctas, bh = item / groups, q0 = (item - bh * groups) * kSelectFusedRows;
  pool_units<kDType, kHeadDim>(p, units_per_head, bh, ring, tables);
  __syncthreads();  // the ring is free; the same memory holds the scores next
  if (threadIdx.x == 0) {
    while (ld_acquire_gpu(p.pool_sync + 1 + bh) < units_per_head) __nanosleep(64);
  }
  __syncthreads();
  topk_fused_rows<kHeadDim, kPerLane, true>(p, bh, q0, fused_smem);
}

template <DType kDType, int kHeadDim, int kPerLane>
cudaError_t launch_topk_pooled(const SelectParams& p, int pool_ctas, cudaStream_t stream) {
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int smem = select_pooled_smem_bytes(kHeadDim, nk, p.geom_q.capacity(), p.geom_k.capacity());
  auto kernel = topk_pooled_kernel<kDType, kHeadDim, kPerLane>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(p.pool_sync, 0, sizeof(int32_t) * (1 + static_cast<size_t>(p.batch) * p.heads), stream);
  if (err != cudaSuccess) return err;
  const int groups = (nq + kSelectFusedRows - 1) / kSelectFusedRows;
  kernel<<<pool_ctas + groups * p.batch * p.heads, kFusedThreads, smem, stream>>>(p, pool_ctas);
  return cudaGetLastError();
}

}  // namespace sel

// Scores and choice from pooled workspaces that are already filled (run_select's last two
// stages; alone, the selection of the context-parallel path, which pools shards itself).
template <int kHeadDim>
cudaError_t run_rank(const SelectParams& p, cudaStream_t stream) {
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks(), bh = p.batch * p.heads;
  if (nq == 0 || nk == 0 || bh == 0) return cudaSuccess;
  const bool cdf = p.cdf_threshold > 0.f;
  if (select_fused_applies(kHeadDim, nk, cdf, current_device_smem_per_sm())) {
    // Registers per lane for a row's keys: the chooser's passes cost in proportion to them.
    static_assert(kSelectFusedMaxKeys == 44 * 32, "the widest variant holds 44 keys a lane");
    if (nk <= 256) return sel::launch_topk_fused<kHeadDim, 8>(p, stream);
    if (nk <= 768) return sel::launch_topk_fused<kHeadDim, 24>(p, stream);
    return sel::launch_topk_fused<kHeadDim, 44>(p, stream);
  }
  const dim3 score_grid((nk + sel::kTile - 1) / sel::kTile, (nq + sel::kTile - 1) / sel::kTile, bh);
  sel::score_kernel<kHeadDim><<<score_grid, sel::kScoreThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int rows = bh * nq;
  // Measured on H100: the warp chooser wins for short rows and for cdf at any width (the CTA
  // chooser re-evaluates exp per bisection step), but loses on long top-k rows (low occupancy).
  if (nk <= 256) return sel::launch_choose_warp<8>(p, rows, stream);
  if (nk <= 768) return sel::launch_choose_warp<24>(p, rows, stream);
  if (cdf && nk <= 1408) return sel::launch_choose_warp<44>(p, rows, stream);
  if (cdf && nk <= 2816) return sel::launch_choose_warp<88>(p, rows, stream);
  if (cdf && nk <= 4096) return sel::launch_choose_warp<128>(p, rows, stream);
  if (!cdf && nk <= 1408) {
    // Long top-k rows: one warp per row. Measured on H100 against the CTA-per-row chooser: 0.33
    // -> 0.26 ms at Nk = 1320 (W720s), but slower at Nk = 2640 (W720: 0.55 ms more), where a
    // warp's 10 KB of keys leave too few warps per SM to hide its serial passes.
    const int smem = sel::kRowWarps * sel::row_chooser_words(nk) * 4;  // <= 29 KB
    sel::choose_row_kernel<><<<(rows + sel::kRowWarps - 1) / sel::kRowWarps, sel::kRowWarps * 32, smem, stream>>>(p);
    return cudaGetLastError();
  }
  const int smem = nk * static_cast<int>(sizeof(uint32_t));
  auto choose = sel::choose_kernel<kHeadDim>;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(choose, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  choose<<<dim3(nq, bh), sel::kChooseThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The pooling stage alone, of p.q over p.geom_q into p.q_pooled (p.k is not read): the
// context-parallel path pools each shard with it before the pooled keys travel.
template <DType kDType, int kHeadDim>
cudaError_t run_pool(const SelectParams& p, cudaStream_t stream) {
  const int n = p.geom_q.num_blocks(), bh = p.batch * p.heads;
  if (n == 0 || bh == 0) return cudaSuccess;
  sel::pool_kernel<kDType, kHeadDim><<<dim3(n, bh), sel::kPoolThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <DType kDType, int kHeadDim>
cudaError_t run_select(const SelectParams& p, cudaStream_t stream) {
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks(), bh = p.batch * p.heads;
  if (nq == 0 || nk == 0 || bh == 0) return cudaSuccess;
  const bool cdf = p.cdf_threshold > 0.f;
  if (p.pool_sync != nullptr && select_pooled_applies(kHeadDim, nk, p.geom_q.capacity(), p.geom_k.capacity(), cdf,
                                                      current_device_smem_per_sm())) {
    // CTAs that only pool: the share of the two CTA slots per SM that the pooling takes in
    // slot-time, with a CTA slot streaming ~25 GB/s through cp.async and a ranking CTA taking
    // ~8 + 0.025 Nk us (both H100), kept within [SMs / 2, SMs]. Measured on H100 (docs/PERF.md,
    // session 10): W720s best near 82 of 132 SMs (0.762 ms; 66: 0.853, 99: 0.781), W720s-c128,
    // whose ranking is a third of W720s's, at 132 (0.551 ms; 99: 0.580). At most one per 64
    // units for small problems (waiting ranking CTAs pool as well).
    const int units = bh * (sel::PoolLayout<kHeadDim>::units(nq) + sel::PoolLayout<kHeadDim>::units(nk));
    const int sms = current_device_sm_count();
    const double tokens = double(p.geom_q.T) * p.geom_q.H * p.geom_q.W + double(p.geom_k.T) * p.geom_k.H * p.geom_k.W;
    const double pool_slot_us = double(bh) * tokens * kHeadDim * 2 / 25e3;
    const double rank_slot_us = double(bh) * ((nq + kSelectFusedRows - 1) / kSelectFusedRows) * (8.0 + 0.025 * nk);
    int pool_ctas = static_cast<int>(2.0 * sms * pool_slot_us / (pool_slot_us + rank_slot_us));
    pool_ctas = std::min(std::max(pool_ctas, sms / 2), sms);
    pool_ctas = std::min(pool_ctas, (units + 63) / 64);
    if (nk <= 256) return sel::launch_topk_pooled<kDType, kHeadDim, 8>(p, pool_ctas, stream);
    if (nk <= 768) return sel::launch_topk_pooled<kDType, kHeadDim, 24>(p, pool_ctas, stream);
    return sel::launch_topk_pooled<kDType, kHeadDim, 44>(p, pool_ctas, stream);
  }
  sel::pool_kernel<kDType, kHeadDim><<<dim3(nq + nk, bh), sel::kPoolThreads, 0, stream>>>(p);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return run_rank<kHeadDim>(p, stream);
}

}  // namespace bsa
