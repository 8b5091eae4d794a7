// Block selection (SPEC §2) in three launches, none of which synchronises with the host:
//   1. pool_kernel: mean of the valid tokens of every q and k block, read in place from
//      the THW tensors with 16-byte loads, fp32 sums, into [B, H, N, D] fp32 workspaces;
//   2. score_kernel: s = q_pooled . k_pooled^T in fp32 (register-tiled SIMT GEMM);
//   3. choose_kernel: one CTA per query block finds the cdf count and the exact top-k
//      by bisection over order-preserving uint32 keys, ties to the smaller id.
// Written order: the chosen ids in ASCENDING block id (consecutive K/V blocks are then
// near each other in memory, which helps L2 in the forward); entries past the count are -1.
#pragma once

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
    const int valid = min(geom.t, o.rem_t) * min(geom.h, o.rem_h) * min(geom.w, o.rem_w);
    float* dst = is_q ? p.q_pooled + (static_cast<int64_t>(bh) * nq + blk) * kHeadDim
                      : p.k_pooled + (static_cast<int64_t>(bh) * p.geom_k.num_blocks() + blk) * kHeadDim;
    dst[tid] = sum / static_cast<float>(valid);
  }
}

// 128x128 score tile per CTA, 8x8 per thread (rows/cols split in two halves of 64 so that a
// warp's float4 reads of a smem row are contiguous). The head dim streams through two smem
// buffers in slices of 16; the next slice is fetched into registers during the FMAs.
constexpr int kTile = 128;
constexpr int kSlice = 16;
constexpr int kScoreThreads = 256;

template <int kHeadDim>
__global__ void __launch_bounds__(kScoreThreads) score_kernel(const SelectParams p) {
  __shared__ __align__(16) float sa[2][kSlice][kTile + 4];  // [buffer][d][query block]
  __shared__ __align__(16) float sb[2][kSlice][kTile + 4];  // [buffer][d][key block]
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int bh = blockIdx.z;
  const int q0 = blockIdx.y * kTile, k0 = blockIdx.x * kTile;
  const float* qa = p.q_pooled + static_cast<int64_t>(bh) * nq * kHeadDim;
  const float* kb = p.k_pooled + static_cast<int64_t>(bh) * nk * kHeadDim;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

  // Each thread moves rows r and r+64, four floats at d offset dd, of both operands per slice.
  const int r = tid / 4, dd = (tid % 4) * 4;
  float4 va[2], vb[2];
  auto fetch = [&](int d0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r + 64 * h;
      va[h] = vb[h] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (q0 + row < nq) va[h] = *reinterpret_cast<const float4*>(qa + static_cast<int64_t>(q0 + row) * kHeadDim + d0 + dd);
      if (k0 + row < nk) vb[h] = *reinterpret_cast<const float4*>(kb + static_cast<int64_t>(k0 + row) * kHeadDim + d0 + dd);
    }
  };
  auto stash = [&](int buf) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = r + 64 * h;
      sa[buf][dd][row] = va[h].x, sa[buf][dd + 1][row] = va[h].y, sa[buf][dd + 2][row] = va[h].z;
      sa[buf][dd + 3][row] = va[h].w;
      sb[buf][dd][row] = vb[h].x, sb[buf][dd + 1][row] = vb[h].y, sb[buf][dd + 2][row] = vb[h].z;
      sb[buf][dd + 3][row] = vb[h].w;
    }
  };

  float acc[8][8] = {};
  fetch(0);
  stash(0);
  __syncthreads();
  constexpr int kSlices = kHeadDim / kSlice;
#pragma unroll 1
  for (int sl = 0; sl < kSlices; ++sl) {
    const int buf = sl & 1;
    if (sl + 1 < kSlices) fetch((sl + 1) * kSlice);
#pragma unroll
    for (int d = 0; d < kSlice; ++d) {
      const float4 a0 = *reinterpret_cast<const float4*>(&sa[buf][d][ty * 4]);
      const float4 a1 = *reinterpret_cast<const float4*>(&sa[buf][d][64 + ty * 4]);
      const float4 b0 = *reinterpret_cast<const float4*>(&sb[buf][d][tx * 4]);
      const float4 b1 = *reinterpret_cast<const float4*>(&sb[buf][d][64 + tx * 4]);
      const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bw[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bw[j], acc[i][j]);
    }
    // The other buffer was last read before the previous barrier, so it can be refilled now.
    if (sl + 1 < kSlices) stash(buf ^ 1);
    __syncthreads();
  }
  float* out = p.scores + static_cast<int64_t>(bh) * nq * nk;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int qi = q0 + (i < 4 ? ty * 4 + i : 64 + ty * 4 + i - 4);
    if (qi >= nq) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int kj = k0 + (j < 4 ? tx * 4 + j : 64 + tx * 4 + j - 4);
      if (kj < nk) out[static_cast<int64_t>(qi) * nk + kj] = acc[i][j];
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
        // Lane l owns bins 255-8l down to 248-8l; a scan over lanes finds the bin holding `rank`.
        int local[8], sum = 0;
#pragma unroll
        for (int i = 0; i < 8; ++i) sum += (local[i] = hist[255 - 8 * tid - i]);
        int incl = sum;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
          const int t = __shfl_up_sync(0xffffffff, incl, off);
          if (tid >= off) incl += t;
        }
        int acc = incl - sum;
        if (acc < rank && rank <= incl) {
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            if (acc + local[i] >= rank) {
              picked[0] = 255 - 8 * tid - i;
              picked[1] = acc;
              break;
            }
            acc += local[i];
          }
        }
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

}  // namespace sel

template <DType kDType, int kHeadDim>
cudaError_t run_select(const SelectParams& p, cudaStream_t stream) {
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks(), bh = p.batch * p.heads;
  if (nq == 0 || nk == 0 || bh == 0) return cudaSuccess;
  sel::pool_kernel<kDType, kHeadDim><<<dim3(nq + nk, bh), sel::kPoolThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 score_grid((nk + sel::kTile - 1) / sel::kTile, (nq + sel::kTile - 1) / sel::kTile, bh);
  sel::score_kernel<kHeadDim><<<score_grid, sel::kScoreThreads, 0, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int smem = nk * static_cast<int>(sizeof(uint32_t));
  auto choose = sel::choose_kernel<kHeadDim>;
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(choose, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  choose<<<dim3(nq, bh), sel::kChooseThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bsa
