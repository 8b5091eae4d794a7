// Block-sparse flash-attention backward for sm_80 and newer (mma.sync, ldmatrix, cp.async).
//
// Three kernels, no atomics, so gradients are bitwise reproducible:
// * delta_kernel: delta = rowsum(dO * O) per query token, fp32;
// * dq_kernel: one CTA per (query block, batch*head), one warp per 16 query rows, walking
//   the block's key blocks like the forward: S = Q K^T, P = exp(S*scale - lse),
//   dP = dO V^T, dS = P (dP - delta), dQ += dS K; K/V double buffered;
// * dkdv_kernel: one CTA per (key block, batch*head), one warp per 16 key rows, walking the
//   query blocks that selected it (inverse index, bsa/invert.cuh): S^T = K Q^T,
//   dV += P^T dO, dP^T = V dO^T, dK += dS^T Q; Q/dO double buffered.
// sm_scale multiplies fp32 products only (S in the exponent, dQ and dK at the end), never a
// rounded operand. Padding rows load as zeros: their P or dO is zero where it matters and
// their rows are never stored.
#pragma once

#include <cmath>

#include "bsa/api.h"
#include "bsa/params.h"
#include "bsa/ptx.cuh"
#include "bsa/tile_sm80.cuh"

namespace bsa {
namespace bwd {

constexpr float kLog2e = 1.4426950408889634f;

// lse in log2 units; a row without keys (lse = -inf) gets +inf so that every p is exactly 0.
__device__ __forceinline__ float lse_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// Softmax statistics of query row `row` of block `q_origin`: lse in log2 units (+inf on
// padding rows and rows without keys, so that every p is 0) and delta.
__device__ __forceinline__ void row_stats(const BackwardParams& p, const RowCoord* q_rows, const BlockOrigin& q_origin,
                                          int bh, int row, float* lse2, float* delta) {
  const RowCoord rc = q_rows[row];
  const bool valid = q_origin.full || row_inside(q_origin, rc.packed);
  const int64_t at = static_cast<int64_t>(bh) * p.seq_q + q_origin.token + rc.offset;
  *lse2 = valid ? lse_log2(p.lse[at]) : INFINITY;
  *delta = valid ? p.delta[at] : 0.f;
}

template <DType kDType, int kHeadDim>
struct DeltaKernel {
  static constexpr int kThreads = 256;
  static constexpr int kLanesPerRow = kHeadDim / 8;  // one 16-byte chunk per lane
  static constexpr int kRows = kThreads / kLanesPerRow;
};

template <DType kDType, int kHeadDim>
__global__ void __launch_bounds__(256) delta_kernel(const BackwardParams p) {
  using K = DeltaKernel<kDType, kHeadDim>;
  using E = ElementOf<kDType>;
  using Element = typename E::type;
  const int bh = blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const int sub = threadIdx.x % K::kLanesPerRow;
  const int row = blockIdx.x * K::kRows + threadIdx.x / K::kLanesPerRow;
  float acc = 0.f;
  if (row < p.seq_q) {
    const Element* o = static_cast<const Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                       static_cast<int64_t>(row) * p.out_row_stride + sub * 8;
    const Element* d = static_cast<const Element*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride +
                       static_cast<int64_t>(row) * p.dout_row_stride + sub * 8;
    const int4 ov = *reinterpret_cast<const int4*>(o), dv = *reinterpret_cast<const int4*>(d);
    const uint32_t* ow = reinterpret_cast<const uint32_t*>(&ov);
    const uint32_t* dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 a = E::unpack(ow[i]), c = E::unpack(dw[i]);
      acc = fmaf(a.x, c.x, fmaf(a.y, c.y, acc));
    }
  }
#pragma unroll
  for (int w = K::kLanesPerRow / 2; w >= 1; w /= 2) acc += __shfl_xor_sync(0xffffffff, acc, w);
  if (row < p.seq_q && sub == 0) p.delta[static_cast<int64_t>(bh) * p.seq_q + row] = acc;
}

// Columns of S / dP handled per step: 64 keys (dq) or queries (dk/dv) keep two 16x64 fp32
// tiles per warp in registers next to the 16 x kHeadDim accumulators.
constexpr int kSub = 64;

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct DqKernel {
  static constexpr int kThreads = kCapQ / 16 * 32;
  static_assert(kCapK % kSub == 0, "key capacity must be a multiple of 64");
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK, int kKvBuffers>
__global__ void __launch_bounds__(DqKernel<kDType, kHeadDim, kCapQ, kCapK>::kThreads)
    dq_kernel(const BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using Element = typename ElementOf<kDType>::type;
  constexpr int kThreads = DqKernel<kDType, kHeadDim, kCapQ, kCapK>::kThreads;
  constexpr int kTile = kCapK * kHeadDim;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sdO = sQ + kCapQ * kHeadDim;
  static_assert(kKvBuffers == 1 || kKvBuffers == 2, "K/V tiles in one stage, or two");
  Element* sK = sdO + kCapQ * kHeadDim;   // [kKvBuffers][kCapK][kHeadDim]
  Element* sV = sK + kKvBuffers * kTile;  // [kKvBuffers][kCapK][kHeadDim]
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(sV + kKvBuffers * kTile);
  RowCoord* k_rows = q_rows + kCapQ;
  uint32_t* k_off = reinterpret_cast<uint32_t*>(k_rows + kCapK);  // row offsets in bytes (row_table_slot)
  uint32_t* v_off = k_off + kCapK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3, warp_row = warp * 16;
  const int qb = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int64_t row_id = static_cast<int64_t>(bh) * nq + qb;
  const int32_t* ids = p.indices + row_id * p.kmax;
  int count = clamped_count(p.counts, row_id, p.kmax);

  init_row_tables<kCapQ, kCapK, kThreads>(q_rows, k_rows, p.geom_q, p.geom_k, tid);
  const bool table_ok = __syncthreads_and(
      init_row_offsets<Element, kHeadDim, kCapK, kThreads>(k_off, v_off, k_rows, p.k_row_stride, p.v_row_stride, tid));

  const Element* q_base = head_base<Element>(p.q, p.q_batch_stride, p.q_head_stride, b, h);
  const Element* do_base = head_base<Element>(p.dout, p.dout_batch_stride, p.dout_head_stride, b, h);
  const Element* k_base = head_base<Element>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const Element* v_base = head_base<Element>(p.v, p.v_batch_stride, p.v_head_stride, b, h);
  const BlockOrigin q_origin = block_origin(p.geom_q, qb);

  load_tile<Element, kHeadDim, kCapQ, kThreads>(sQ, q_base, p.q_row_stride, q_rows, q_origin, true, tid);
  load_tile<Element, kHeadDim, kCapQ, kThreads>(sdO, do_base, p.dout_row_stride, q_rows, q_origin, true, tid);
  // Out-of-range ids load zeros and are fully masked, as in the forward: they contribute nothing.
  const int first = count > 0 ? ids[0] : 0;
  bool live = in_range(first, nk);
  BlockOrigin origin = block_origin(p.geom_k, live ? first : 0);
  if (count > 0) {
    load_block_tile<Element, kHeadDim, kCapK, kThreads>(sK, k_base, p.k_row_stride, k_off, table_ok, k_rows, origin,
                                                        live, tid);
    load_block_tile<Element, kHeadDim, kCapK, kThreads>(sV, v_base, p.v_row_stride, v_off, table_ok, k_rows, origin,
                                                        live, tid);
  }
  cp_async_commit();
  int next_id = count > 1 ? ids[1] : 0;

  // Softmax statistics of this thread's two rows (g and g+8 of the warp).
  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) row_stats(p, q_rows, q_origin, bh, warp_row + g + 8 * hr, &lse2[hr], &delta[hr]);

  float acc_dq[kHeadDim / 8][4];
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j) acc_dq[j][0] = acc_dq[j][1] = acc_dq[j][2] = acc_dq[j][3] = 0.f;

  for (int n = 0; n < count; ++n) {
    const int stage = kKvBuffers == 2 ? n & 1 : 0;
    cp_async_wait<0>();  // K_n, V_n (and Q, dO) landed for this thread ...
    __syncthreads();     // ... and every thread; every warp is done with block n-1's stage
    const int nid = next_id;
    const bool nlive = in_range(nid, nk);
    const BlockOrigin norigin = block_origin(p.geom_k, nlive ? nid : 0);
    // K_{n+1}, V_{n+1} go into the other stage now, or with one stage after this block's products.
    const auto request_next = [&](int into) {
      if (n + 1 < count) {
        load_block_tile<Element, kHeadDim, kCapK, kThreads>(sK + into * kTile, k_base, p.k_row_stride, k_off,
                                                            table_ok, k_rows, norigin, nlive, tid);
        load_block_tile<Element, kHeadDim, kCapK, kThreads>(sV + into * kTile, v_base, p.v_row_stride, v_off,
                                                            table_ok, k_rows, norigin, nlive, tid);
        next_id = n + 2 < count ? ids[n + 2] : 0;
      }
      cp_async_commit();
    };
    if constexpr (kKvBuffers == 2) request_next(stage ^ 1);
    const Element* k_tile = sK + stage * kTile;
    const Element* v_tile = sV + stage * kTile;

#pragma unroll
    for (int col0 = 0; col0 < kCapK; col0 += kSub) {
      float s[kSub / 8][4], dp[kSub / 8][4];
#pragma unroll
      for (int j = 0; j < kSub / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      warp_gemm_nt<kDType, kHeadDim, kSub / 8>(s, sQ, warp_row, k_tile, col0, lane);
      warp_gemm_nt<kDType, kHeadDim, kSub / 8>(dp, sdO, warp_row, v_tile, col0, lane);
      const bool masked = !(live && origin.full);
#pragma unroll
      for (int j = 0; j < kSub / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hr = e >> 1;
          float pr = exp2_approx(fmaf(s[j][e], p.scale_log2, -lse2[hr]));
          if (masked && !(live && row_inside(origin, k_rows[col0 + j * 8 + 2 * c + (e & 1)].packed))) pr = 0.f;
          s[j][e] = pr * (dp[j][e] - delta[hr]);  // dS
        }
      }
      warp_gemm_rn<kDType, kHeadDim, kSub / 8>(acc_dq, s, k_tile, col0, lane);
    }
    if constexpr (kKvBuffers == 1) {
      __syncthreads();  // every warp is done with K_n, V_n
      request_next(0);
    }
    live = nlive;
    origin = norigin;
  }

  cp_async_wait<0>();
  __syncthreads();
  stage_rows<kDType, kHeadDim>(sQ, warp_row, acc_dq, p.sm_scale, lane);
  __syncwarp();
  Element* dq_base = static_cast<Element*>(p.dq) + (static_cast<int64_t>(bh) * p.seq_q) * kHeadDim;
  store_rows<Element, kHeadDim, 16>(dq_base, kHeadDim, sQ, warp_row, q_rows, q_origin, lane);
#endif
}

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct DkdvKernel {
  static constexpr int kThreads = kCapK / 16 * 32;
  static constexpr int kSmem = backward_dkdv_smem_bytes(kHeadDim, kCapQ, kCapK);
  static_assert(kCapQ % kSub == 0, "query capacity must be a multiple of 64");
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(DkdvKernel<kDType, kHeadDim, kCapQ, kCapK>::kThreads)
    dkdv_kernel(const BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using Element = typename ElementOf<kDType>::type;
  constexpr int kThreads = DkdvKernel<kDType, kHeadDim, kCapQ, kCapK>::kThreads;
  constexpr int kTile = kCapQ * kHeadDim;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw);
  Element* sV = sK + kCapK * kHeadDim;
  Element* sQ = sV + kCapK * kHeadDim;  // [2][kCapQ][kHeadDim]
  Element* sdO = sQ + 2 * kTile;        // [2][kCapQ][kHeadDim]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * kTile);  // [2][kCapQ], raw lse (0 on padding rows)
  float* sDelta = sLse + 2 * kCapQ;                         // [2][kCapQ]
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(sDelta + 2 * kCapQ);
  RowCoord* k_rows = q_rows + kCapQ;
  uint32_t* q_off = reinterpret_cast<uint32_t*>(k_rows + kCapK);  // row offsets in bytes (row_table_slot)
  uint32_t* do_off = q_off + kCapQ;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = lane & 3, warp_row = warp * 16;
  const int kb = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int64_t list_len = static_cast<int64_t>(nq) * p.kmax;
  const int32_t* list = p.qlist + bh * list_len;
  const int32_t* offs = p.qoffsets + static_cast<int64_t>(bh) * (nk + 1);
  int begin = offs[kb], end = offs[kb + 1];
  begin = begin < 0 ? 0 : (begin > list_len ? int(list_len) : begin);
  end = end < begin ? begin : (end > list_len ? int(list_len) : end);
  const int len = end - begin;

  init_row_tables<kCapQ, kCapK, kThreads>(q_rows, k_rows, p.geom_q, p.geom_k, tid);
  const bool table_ok = __syncthreads_and(init_row_offsets<Element, kHeadDim, kCapQ, kThreads>(
      q_off, do_off, q_rows, p.q_row_stride, p.dout_row_stride, tid));

  const Element* q_base = head_base<Element>(p.q, p.q_batch_stride, p.q_head_stride, b, h);
  const Element* do_base = head_base<Element>(p.dout, p.dout_batch_stride, p.dout_head_stride, b, h);
  const Element* k_base = head_base<Element>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const Element* v_base = head_base<Element>(p.v, p.v_batch_stride, p.v_head_stride, b, h);
  const float* lse_base = p.lse + static_cast<int64_t>(bh) * p.seq_q;
  const float* delta_base = p.delta + static_cast<int64_t>(bh) * p.seq_q;
  const BlockOrigin k_origin = block_origin(p.geom_k, kb);

  // Q, dO, lse and delta rows of query block `qb` into buffer `buf` (zeros on padding rows).
  auto load_query_block = [&](int buf, int qb) {
    const bool live = qb >= 0 && qb < nq;
    const BlockOrigin o = block_origin(p.geom_q, live ? qb : 0);
    load_block_tile<Element, kHeadDim, kCapQ, kThreads>(sQ + buf * kTile, q_base, p.q_row_stride, q_off, table_ok,
                                                        q_rows, o, live, tid);
    load_block_tile<Element, kHeadDim, kCapQ, kThreads>(sdO + buf * kTile, do_base, p.dout_row_stride, do_off,
                                                        table_ok, q_rows, o, live, tid);
    for (int r = tid; r < kCapQ; r += kThreads) {
      const RowCoord rc = q_rows[r];
      const bool ok = live && (o.full || row_inside(o, rc.packed));
      const int64_t at = ok ? o.token + rc.offset : 0;
      cp_async_4(sLse + buf * kCapQ + r, lse_base + at, ok ? 4 : 0);
      cp_async_4(sDelta + buf * kCapQ + r, delta_base + at, ok ? 4 : 0);
    }
  };

  load_tile<Element, kHeadDim, kCapK, kThreads>(sK, k_base, p.k_row_stride, k_rows, k_origin, true, tid);
  load_tile<Element, kHeadDim, kCapK, kThreads>(sV, v_base, p.v_row_stride, k_rows, k_origin, true, tid);
  if (len > 0) load_query_block(0, list[begin]);
  cp_async_commit();
  int next_qb = len > 1 ? list[begin + 1] : 0;

  float acc_dk[kHeadDim / 8][4], acc_dv[kHeadDim / 8][4];
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_dk[j][e] = acc_dv[j][e] = 0.f;

  for (int m = 0; m < len; ++m) {
    const int buf = m & 1;
    cp_async_wait<0>();
    __syncthreads();
    if (m + 1 < len) {
      load_query_block(buf ^ 1, next_qb);
      next_qb = m + 2 < len ? list[begin + m + 2] : 0;
    }
    cp_async_commit();
    const Element* q_tile = sQ + buf * kTile;
    const Element* do_tile = sdO + buf * kTile;
    const float* lse_row = sLse + buf * kCapQ;
    const float* delta_row = sDelta + buf * kCapQ;

#pragma unroll
    for (int col0 = 0; col0 < kCapQ; col0 += kSub) {
      float s[kSub / 8][4], dp[kSub / 8][4];
#pragma unroll
      for (int j = 0; j < kSub / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
      warp_gemm_nt<kDType, kHeadDim, kSub / 8>(s, sK, warp_row, q_tile, col0, lane);   // S^T
      warp_gemm_nt<kDType, kHeadDim, kSub / 8>(dp, sV, warp_row, do_tile, col0, lane);  // dP^T
#pragma unroll
      for (int j = 0; j < kSub / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = col0 + j * 8 + 2 * c + (e & 1);
          const float pr = exp2_approx(fmaf(s[j][e], p.scale_log2, -lse_log2(lse_row[col])));
          s[j][e] = pr;                                  // P^T
          dp[j][e] = pr * (dp[j][e] - delta_row[col]);  // dS^T
        }
      }
      warp_gemm_rn<kDType, kHeadDim, kSub / 8>(acc_dv, s, do_tile, col0, lane);
      warp_gemm_rn<kDType, kHeadDim, kSub / 8>(acc_dk, dp, q_tile, col0, lane);
    }
  }

  cp_async_wait<0>();
  __syncthreads();
  stage_rows<kDType, kHeadDim>(sK, warp_row, acc_dk, p.sm_scale, lane);
  stage_rows<kDType, kHeadDim>(sV, warp_row, acc_dv, 1.f, lane);
  __syncwarp();
  const int64_t head_offset = (static_cast<int64_t>(bh) * p.seq_k) * kHeadDim;
  store_rows<Element, kHeadDim, 16>(static_cast<Element*>(p.dk) + head_offset, kHeadDim, sK, warp_row, k_rows,
                                    k_origin, lane);
  store_rows<Element, kHeadDim, 16>(static_cast<Element*>(p.dv) + head_offset, kHeadDim, sV, warp_row, k_rows,
                                    k_origin, lane);
#endif
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace bwd

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_backward(const BackwardParams& params, cudaStream_t stream) {
  using Delta = bwd::DeltaKernel<kDType, kHeadDim>;
  using Dq = bwd::DqKernel<kDType, kHeadDim, kCapQ, kCapK>;
  using Dkdv = bwd::DkdvKernel<kDType, kHeadDim, kCapQ, kCapK>;
  const int dq_buffers = params.kv_buffers != 0
                             ? params.kv_buffers
                             : dq_kv_buffers(kHeadDim, kCapQ, kCapK, current_device_smem_per_sm());
  auto dq = dq_buffers == 1 ? bwd::dq_kernel<kDType, kHeadDim, kCapQ, kCapK, 1>
                            : bwd::dq_kernel<kDType, kHeadDim, kCapQ, kCapK, 2>;
  const int dq_smem = backward_dq_smem_bytes(kHeadDim, kCapQ, kCapK, dq_buffers);
  auto dkdv = bwd::dkdv_kernel<kDType, kHeadDim, kCapQ, kCapK>;
  cudaError_t err = bwd::allow_smem(dq, dq_smem);
  if (err == cudaSuccess) err = bwd::allow_smem(dkdv, Dkdv::kSmem);
  if (err != cudaSuccess) return err;
  const int rows = params.batch * params.heads;
  if (rows == 0) return cudaSuccess;
  const dim3 delta_grid((params.seq_q + Delta::kRows - 1) / Delta::kRows, rows);
  bwd::delta_kernel<kDType, kHeadDim><<<delta_grid, Delta::kThreads, 0, stream>>>(params);
  dq<<<dim3(params.geom_q.num_blocks(), rows), Dq::kThreads, dq_smem, stream>>>(params);
  dkdv<<<dim3(params.geom_k.num_blocks(), rows), Dkdv::kThreads, Dkdv::kSmem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace bsa
