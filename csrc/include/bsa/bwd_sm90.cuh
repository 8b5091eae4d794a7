// Block-sparse flash-attention backward for Hopper (sm_90a): wgmma on 128-byte-swizzled tiles.
//
// Same decomposition as bwd_sm80.cuh (delta, then dq per query block over its key blocks and
// dk/dv per key block over the query blocks that selected it: no atomics, deterministic), but
// every product is a warpgroup wgmma with 64 rows per warpgroup, so an operand tile in shared
// memory feeds 64 rows instead of the 16 of a mma.sync warp:
//   dq:   S = Q K^T, dP = dO V^T (both operands from smem), dQ += dS K (dS from registers,
//         K read MN-major);
//   dkdv: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
// Tiles are gathered from the THW layout with cp.async (zero rows for padding) straight into the
// 128B-swizzle layout that the wgmma descriptors describe: per 64-column half, rows of 128 bytes
// whose 16-byte units are XORed with row % 8, each tile 1024-byte aligned. Double buffered:
// the next block streams in while the current one is multiplied.
#pragma once

#include <cmath>
#include <cstdint>

#include "bsa/api.h"
#include "bsa/bwd_sm80.cuh"
#include "bsa/params.h"
#include "bsa/ptx.cuh"
#include "bsa/sm90_api.cuh"
#include "bsa/sm90_ptx.cuh"
#include "bsa/tile_sm80.cuh"

namespace bsa {
namespace bwd90 {

// Byte offset of 16-byte unit `ch` of row `r` in a kRows-row tile (halves of 64 columns).
template <int kRows>
__device__ __forceinline__ uint32_t sw128_offset(int r, int ch) {
  return (ch >> 3) * (kRows * 128) + r * 128 + (((ch & 7) ^ (r & 7)) << 4);
}

// cp.async gather of block `o` into a 128B-swizzled tile (zeros where padding or !live).
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_tile_sw128(unsigned char* smem, const Element* base, int64_t row_stride,
                                                const RowCoord* rows, const BlockOrigin& o, bool live, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  static_assert(kRows * kChunks % kThreads == 0, "tile must split evenly over the threads");
  const Element* block_base = base + static_cast<int64_t>(o.token) * row_stride;
#pragma unroll 4
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int i = tid + it * kThreads;
    const int r = i / kChunks, ch = i % kChunks;
    const RowCoord rc = rows[r];
    const bool ok = live && (o.full || row_inside(o, rc.packed));
    const Element* src = ok ? block_base + static_cast<int64_t>(rc.offset) * row_stride + ch * 8 : base;
    cp_async_16(smem + sw128_offset<kRows>(r, ch), src, ok ? 16 : 0);
  }
}

// acc (64 x 64) = A[a_row0 .. +64] B[b_row0 .. +64]^T over kHeadDim, both K-major 128B-swizzled
// tiles of kARows / kBRows rows (rows 64-aligned so that every start stays 1024-aligned).
template <DType kDType, int kHeadDim, int kARows, int kBRows>
__device__ __forceinline__ void issue_nt(float (&acc)[32], uint32_t a_tile, int a_row0, uint32_t b_tile, int b_row0) {
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    const uint32_t a = a_tile + (kk / 4) * kARows * 128 + a_row0 * 128 + (kk % 4) * 32;
    const uint32_t b = b_tile + (kk / 4) * kBRows * 128 + b_row0 * 128 + (kk % 4) * 32;
    sm90::wgmma_ss<kDType, 64>(acc, sm90::smem_desc_sw128(a, 16), sm90::smem_desc_sw128(b, 16), kk > 0);
  }
}

// acc (64 x kHeadDim) += A (64 x 64, register fragments) B[b_row0 .. +64, :], B MN-major.
template <DType kDType, int kHeadDim, int kBRows>
__device__ __forceinline__ void issue_rn(float (&acc)[kHeadDim / 2], const uint32_t (&a)[4][4], uint32_t b_tile,
                                         int b_row0) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
    sm90::wgmma_rs<kDType, kHeadDim, true>(acc, a[kk], sm90::smem_desc_sw128(b_tile + (b_row0 + kk * 16) * 128, kBRows * 128),
                                           1);
}

// 64 x 64 fp32 accumulator -> A fragments of a k = 64 product (the mma.sync layout wgmma takes).
template <DType kDType>
__device__ __forceinline__ void pack_a(uint32_t (&a)[4][4], const float (&s)[32]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) a[kk][i] = ElementOf<kDType>::pack(s[8 * kk + 2 * i], s[8 * kk + 2 * i + 1]);
}

template <int kRows, int kHeadDim>
constexpr int tile_bytes() {
  return kRows * kHeadDim * 2;
}

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct DqTraits {
  static constexpr int kThreads = kCapQ * 2;  // one warpgroup per 64 query rows
  static constexpr int kOffQ = 0;
  static constexpr int kOffDo = kOffQ + tile_bytes<kCapQ, kHeadDim>();
  static constexpr int kOffK = kOffDo + tile_bytes<kCapQ, kHeadDim>();  // [2]
  static constexpr int kOffV = kOffK + 2 * tile_bytes<kCapK, kHeadDim>();  // [2]
  static constexpr int kOffRows = kOffV + 2 * tile_bytes<kCapK, kHeadDim>();
  static constexpr int kSmem = kOffRows + 8 * (kCapQ + kCapK) + 1024;  // + alignment slack
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(DqTraits<kDType, kHeadDim, kCapQ, kCapK>::kThreads, 1)
    dq_kernel(const BackwardParams p) {
#if !BSA_SM90_ENABLED
  __trap();  // built for other targets only so that one build covers every arch; never launched there
#else
  using Tr = DqTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename ElementOf<kDType>::type;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kTileK = tile_bytes<kCapK, kHeadDim>();
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(smem + Tr::kOffRows);
  RowCoord* k_rows = q_rows + kCapQ;
  const uint32_t q_addr = sm90::smem_u32(smem + Tr::kOffQ), do_addr = sm90::smem_u32(smem + Tr::kOffDo);
  const uint32_t k_addr = sm90::smem_u32(smem + Tr::kOffK), v_addr = sm90::smem_u32(smem + Tr::kOffV);

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, quad = lane % 4;
  const int row0 = wg * 64 + warp * 16;  // this warp's first query row
  const int qb = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.heads, h = bh % p.heads;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int64_t row_id = static_cast<int64_t>(bh) * nq + qb;
  const int32_t* ids = p.indices + row_id * p.kmax;
  int count = p.counts[row_id];
  count = count < 0 ? 0 : (count > p.kmax ? p.kmax : count);

  for (int r = tid; r < kCapQ; r += kThreads) q_rows[r] = row_coord(p.geom_q, r);
  for (int r = tid; r < kCapK; r += kThreads) k_rows[r] = row_coord(p.geom_k, r);
  __syncthreads();

  const Element* q_base = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* do_base = static_cast<const Element*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const Element* k_base = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const BlockOrigin q_origin = block_origin(p.geom_q, qb);

  load_tile_sw128<Element, kHeadDim, kCapQ, kThreads>(smem + Tr::kOffQ, q_base, p.q_row_stride, q_rows, q_origin, true, tid);
  load_tile_sw128<Element, kHeadDim, kCapQ, kThreads>(smem + Tr::kOffDo, do_base, p.dout_row_stride, q_rows, q_origin,
                                                      true, tid);
  const int first = count > 0 ? ids[0] : 0;
  bool live = first >= 0 && first < nk;
  BlockOrigin origin = block_origin(p.geom_k, live ? first : 0);
  if (count > 0) {
    load_tile_sw128<Element, kHeadDim, kCapK, kThreads>(smem + Tr::kOffK, k_base, p.k_row_stride, k_rows, origin, live, tid);
    load_tile_sw128<Element, kHeadDim, kCapK, kThreads>(smem + Tr::kOffV, v_base, p.v_row_stride, k_rows, origin, live, tid);
  }
  cp_async_commit();
  int next_id = count > 1 ? ids[1] : 0;

  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const RowCoord rc = q_rows[row0 + g + 8 * hr];
    const bool valid = q_origin.full || row_inside(q_origin, rc.packed);
    const int64_t at = static_cast<int64_t>(bh) * p.seq_q + q_origin.token + rc.offset;
    lse2[hr] = valid ? bwd::lse_log2(p.lse[at]) : INFINITY;
    delta[hr] = valid ? p.delta[at] : 0.f;
  }

  float acc_dq[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) acc_dq[i] = 0.f;

  for (int n = 0; n < count; ++n) {
    const int stage = n & 1;
    cp_async_wait<0>();
    sm90::fence_proxy_async_smem();  // this thread's cp.async rows become visible to wgmma
    __syncthreads();                 // ... for every thread; stage^1 is free (waited below)
    const int nid = next_id;
    const bool nlive = nid >= 0 && nid < nk;
    const BlockOrigin norigin = block_origin(p.geom_k, nlive ? nid : 0);
    if (n + 1 < count) {
      load_tile_sw128<Element, kHeadDim, kCapK, kThreads>(smem + Tr::kOffK + (stage ^ 1) * kTileK, k_base, p.k_row_stride,
                                                          k_rows, norigin, nlive, tid);
      load_tile_sw128<Element, kHeadDim, kCapK, kThreads>(smem + Tr::kOffV + (stage ^ 1) * kTileK, v_base, p.v_row_stride,
                                                          k_rows, norigin, nlive, tid);
      next_id = n + 2 < count ? ids[n + 2] : 0;
    }
    cp_async_commit();
    const uint32_t k_tile = k_addr + stage * kTileK, v_tile = v_addr + stage * kTileK;

#pragma unroll
    for (int col0 = 0; col0 < kCapK; col0 += 64) {
      float s[32], dp[32];
      sm90::wgmma_fence();
      issue_nt<kDType, kHeadDim, kCapQ, kCapK>(s, q_addr, wg * 64, k_tile, col0);
      issue_nt<kDType, kHeadDim, kCapQ, kCapK>(dp, do_addr, wg * 64, v_tile, col0);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_registers(s);
      sm90::fence_registers(dp);
      const bool masked = !(live && origin.full);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hr = e >> 1;
          float pr = exp2_approx(fmaf(s[4 * j + e], p.scale_log2, -lse2[hr]));
          if (masked && !(live && row_inside(origin, k_rows[col0 + 8 * j + 2 * quad + (e & 1)].packed))) pr = 0.f;
          s[4 * j + e] = pr * (dp[4 * j + e] - delta[hr]);  // dS
        }
      }
      uint32_t ds[4][4];
      pack_a<kDType>(ds, s);
      sm90::wgmma_fence();
      issue_rn<kDType, kHeadDim, kCapK>(acc_dq, ds, k_tile, col0);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_dq);
    }
    live = nlive;
    origin = norigin;
  }

  cp_async_wait<0>();
  __syncthreads();  // every warpgroup is done with the Q tile, which now stages dQ
  Element* stage_tile = reinterpret_cast<Element*>(smem + Tr::kOffQ);
  stage_rows<kDType, kHeadDim>(stage_tile, row0, reinterpret_cast<const float(&)[kHeadDim / 8][4]>(acc_dq), p.sm_scale,
                               lane);
  __syncwarp();
  Element* dq_base = static_cast<Element*>(p.dq) + (static_cast<int64_t>(bh) * p.seq_q) * kHeadDim;
  store_rows<Element, kHeadDim, 16>(dq_base, kHeadDim, stage_tile, row0, q_rows, q_origin, lane);
#endif
}

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct DkdvTraits {
  static constexpr int kThreads = kCapK * 2;  // one warpgroup per 64 key rows
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + tile_bytes<kCapK, kHeadDim>();
  static constexpr int kOffQ = kOffV + tile_bytes<kCapK, kHeadDim>();    // [2]
  static constexpr int kOffDo = kOffQ + 2 * tile_bytes<kCapQ, kHeadDim>();  // [2]
  static constexpr int kOffStats = kOffDo + 2 * tile_bytes<kCapQ, kHeadDim>();  // lse [2][kCapQ], delta [2][kCapQ]
  static constexpr int kOffRows = kOffStats + 16 * kCapQ;
  static constexpr int kSmem = kOffRows + 8 * (kCapQ + kCapK) + 1024;
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(DkdvTraits<kDType, kHeadDim, kCapQ, kCapK>::kThreads, 1)
    dkdv_kernel(const BackwardParams p) {
#if !BSA_SM90_ENABLED
  __trap();
#else
  using Tr = DkdvTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename ElementOf<kDType>::type;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kTileQ = tile_bytes<kCapQ, kHeadDim>();
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  float* s_lse = reinterpret_cast<float*>(smem + Tr::kOffStats);  // [2][kCapQ], raw (0 on padding rows)
  float* s_delta = s_lse + 2 * kCapQ;
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(smem + Tr::kOffRows);
  RowCoord* k_rows = q_rows + kCapQ;
  const uint32_t k_addr = sm90::smem_u32(smem + Tr::kOffK), v_addr = sm90::smem_u32(smem + Tr::kOffV);
  const uint32_t q_addr = sm90::smem_u32(smem + Tr::kOffQ), do_addr = sm90::smem_u32(smem + Tr::kOffDo);

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int quad = lane % 4;
  const int row0 = wg * 64 + warp * 16;  // this warp's first key row
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

  for (int r = tid; r < kCapQ; r += kThreads) q_rows[r] = row_coord(p.geom_q, r);
  for (int r = tid; r < kCapK; r += kThreads) k_rows[r] = row_coord(p.geom_k, r);
  __syncthreads();

  const Element* q_base = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* do_base = static_cast<const Element*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const Element* k_base = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride;
  const Element* v_base = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride;
  const float* lse_base = p.lse + static_cast<int64_t>(bh) * p.seq_q;
  const float* delta_base = p.delta + static_cast<int64_t>(bh) * p.seq_q;
  const BlockOrigin k_origin = block_origin(p.geom_k, kb);

  auto load_query_block = [&](int buf, int qb) {
    const bool ok_block = qb >= 0 && qb < nq;
    const BlockOrigin o = block_origin(p.geom_q, ok_block ? qb : 0);
    load_tile_sw128<Element, kHeadDim, kCapQ, kThreads>(smem + Tr::kOffQ + buf * kTileQ, q_base, p.q_row_stride, q_rows, o,
                                                        ok_block, tid);
    load_tile_sw128<Element, kHeadDim, kCapQ, kThreads>(smem + Tr::kOffDo + buf * kTileQ, do_base, p.dout_row_stride,
                                                        q_rows, o, ok_block, tid);
    for (int r = tid; r < kCapQ; r += kThreads) {
      const RowCoord rc = q_rows[r];
      const bool ok = ok_block && (o.full || row_inside(o, rc.packed));
      const int64_t at = ok ? o.token + rc.offset : 0;
      cp_async_4(s_lse + buf * kCapQ + r, lse_base + at, ok ? 4 : 0);
      cp_async_4(s_delta + buf * kCapQ + r, delta_base + at, ok ? 4 : 0);
    }
  };

  load_tile_sw128<Element, kHeadDim, kCapK, kThreads>(smem + Tr::kOffK, k_base, p.k_row_stride, k_rows, k_origin, true, tid);
  load_tile_sw128<Element, kHeadDim, kCapK, kThreads>(smem + Tr::kOffV, v_base, p.v_row_stride, k_rows, k_origin, true, tid);
  if (len > 0) load_query_block(0, list[begin]);
  cp_async_commit();
  int next_qb = len > 1 ? list[begin + 1] : 0;

  float acc_dk[kHeadDim / 2], acc_dv[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;

  for (int m = 0; m < len; ++m) {
    const int buf = m & 1;
    cp_async_wait<0>();
    sm90::fence_proxy_async_smem();
    __syncthreads();
    if (m + 1 < len) {
      load_query_block(buf ^ 1, next_qb);
      next_qb = m + 2 < len ? list[begin + m + 2] : 0;
    }
    cp_async_commit();
    const uint32_t q_tile = q_addr + buf * kTileQ, do_tile = do_addr + buf * kTileQ;
    const float* lse_row = s_lse + buf * kCapQ;
    const float* delta_row = s_delta + buf * kCapQ;

#pragma unroll
    for (int col0 = 0; col0 < kCapQ; col0 += 64) {
      float s[32], dp[32];
      sm90::wgmma_fence();
      issue_nt<kDType, kHeadDim, kCapK, kCapQ>(s, k_addr, wg * 64, q_tile, col0);    // S^T
      issue_nt<kDType, kHeadDim, kCapK, kCapQ>(dp, v_addr, wg * 64, do_tile, col0);  // dP^T
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_registers(s);
      sm90::fence_registers(dp);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = col0 + 8 * j + 2 * quad + (e & 1);
          const float pr = exp2_approx(fmaf(s[4 * j + e], p.scale_log2, -bwd::lse_log2(lse_row[col])));
          s[4 * j + e] = pr;                                     // P^T
          dp[4 * j + e] = pr * (dp[4 * j + e] - delta_row[col]);  // dS^T
        }
      }
      uint32_t pf[4][4], df[4][4];
      pack_a<kDType>(pf, s);
      pack_a<kDType>(df, dp);
      sm90::wgmma_fence();
      issue_rn<kDType, kHeadDim, kCapQ>(acc_dv, pf, do_tile, col0);
      issue_rn<kDType, kHeadDim, kCapQ>(acc_dk, df, q_tile, col0);
      sm90::wgmma_commit();
      sm90::wgmma_wait<0>();
      sm90::fence_registers(acc_dv);
      sm90::fence_registers(acc_dk);
    }
  }

  cp_async_wait<0>();
  __syncthreads();  // K and V tiles are free for staging dK and dV
  Element* sk = reinterpret_cast<Element*>(smem + Tr::kOffK);
  Element* sv = reinterpret_cast<Element*>(smem + Tr::kOffV);
  stage_rows<kDType, kHeadDim>(sk, row0, reinterpret_cast<const float(&)[kHeadDim / 8][4]>(acc_dk), p.sm_scale, lane);
  stage_rows<kDType, kHeadDim>(sv, row0, reinterpret_cast<const float(&)[kHeadDim / 8][4]>(acc_dv), 1.f, lane);
  __syncwarp();
  const int64_t head_offset = (static_cast<int64_t>(bh) * p.seq_k) * kHeadDim;
  store_rows<Element, kHeadDim, 16>(static_cast<Element*>(p.dk) + head_offset, kHeadDim, sk, row0, k_rows, k_origin, lane);
  store_rows<Element, kHeadDim, 16>(static_cast<Element*>(p.dv) + head_offset, kHeadDim, sv, row0, k_rows, k_origin, lane);
#endif
}

}  // namespace bwd90

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_backward_sm90(const BackwardParams& params, cudaStream_t stream, bool* launched) {
  using Delta = bwd::DeltaKernel<kDType, kHeadDim>;
  using Dq = bwd90::DqTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Dkdv = bwd90::DkdvTraits<kDType, kHeadDim, kCapQ, kCapK>;
  *launched = false;
  auto dq = bwd90::dq_kernel<kDType, kHeadDim, kCapQ, kCapK>;
  auto dkdv = bwd90::dkdv_kernel<kDType, kHeadDim, kCapQ, kCapK>;
  // Only sm_90a machine code runs these kernels (a build without 90a falls back to sm80).
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, dq) != cudaSuccess || attr.binaryVersion != 90) {
    cudaGetLastError();
    return cudaSuccess;
  }
  cudaError_t err = bwd::allow_smem(dq, Dq::kSmem);
  if (err == cudaSuccess) err = bwd::allow_smem(dkdv, Dkdv::kSmem);
  if (err != cudaSuccess) return err;
  *launched = true;
  const int rows = params.batch * params.heads;
  if (rows == 0) return cudaSuccess;
  const dim3 delta_grid((params.seq_q + Delta::kRows - 1) / Delta::kRows, rows);
  bwd::delta_kernel<kDType, kHeadDim><<<delta_grid, Delta::kThreads, 0, stream>>>(params);
  dq<<<dim3(params.geom_q.num_blocks(), rows), Dq::kThreads, Dq::kSmem, stream>>>(params);
  dkdv<<<dim3(params.geom_k.num_blocks(), rows), Dkdv::kThreads, Dkdv::kSmem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace bsa
