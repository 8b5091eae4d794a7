// Block-sparse flash-attention backward for Hopper (sm_90a): TMA + mbarrier + wgmma.
//
// Same decomposition as bwd_sm80.cuh (delta, then dq per query block over its key blocks and
// dk/dv per key block over the query blocks that selected it: no atomics, deterministic), but
// every product is a warpgroup wgmma with 64 rows per warpgroup, so an operand tile in shared
// memory feeds 64 rows instead of the 16 of a mma.sync warp:
//   dq:   S = Q K^T, dP = dO V^T (both operands from smem), dQ += dS K (dS from registers,
//         K read MN-major);
//   dkdv: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
// Tiles arrive by TMA over the THW layout (bsa/sm90_tma.cuh: one box per chunk half, 128-byte
// swizzle, zeros for the rows of partial edge chunks), issued by one thread and completed on
// mbarriers; double buffered, so block n+1 streams in while block n is multiplied. Out-of-range
// ids load block 0 (finite data) and are masked to P = 0, as in the forward.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "bsa/api.h"
#include "bsa/bwd_sm80.cuh"
#include "bsa/params.h"
#include "bsa/ptx.cuh"
#include "bsa/sm90_api.cuh"
#include "bsa/sm90_ptx.cuh"
#include "bsa/sm90_tma.cuh"
#include "bsa/tile_sm80.cuh"

namespace bsa {
namespace bwd90 {

// The four tensor maps of one launch (q and dout over the query geometry, k and v over the key one).
struct BwdMaps {
  CUtensorMap q, k, v, dout;
};

// Loads both 64-column halves of block `id`'s chunk into a tile, completing on `bar`.
template <int kRows, int kHeadDim>
__device__ __forceinline__ void tma_chunk(unsigned char* tile, const CUtensorMap* map, uint64_t* bar,
                                          const Geometry& g, int id, int head) {
  const sm90::BoxOrigin o = sm90::box_origin(g, id);
#pragma unroll
  for (int half = 0; half < kHeadDim / 64; ++half)
    sm90::tma_load_5d(tile + half * kRows * 128, map, bar, half * 64, o.x, o.y, o.z, head);
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
  static constexpr int kTileQ = tile_bytes<kCapQ, kHeadDim>();
  static constexpr int kTileK = tile_bytes<kCapK, kHeadDim>();
  static constexpr int kOffQ = 0;
  static constexpr int kOffDo = kOffQ + kTileQ;
  static constexpr int kOffK = kOffDo + kTileQ;      // [2]
  static constexpr int kOffV = kOffK + 2 * kTileK;   // [2]
  static constexpr int kOffBars = kOffV + 2 * kTileK;  // q_full, kv_full[2]
  static constexpr int kOffRows = kOffBars + 32;
  static constexpr int kSmem = kOffRows + 8 * (kCapQ + kCapK) + 1024;  // + alignment slack
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(DqTraits<kDType, kHeadDim, kCapQ, kCapK>::kThreads, 1)
    dq_kernel(const __grid_constant__ BwdMaps maps, const BackwardParams p, const int bh_base) {
#if !BSA_SM90_ENABLED
  __trap();  // built for other targets only so that one build covers every arch; never launched there
#else
  using Tr = DqTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename ElementOf<kDType>::type;
  constexpr int kThreads = Tr::kThreads;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + Tr::kOffBars);
  uint64_t* kv_full = q_full + 1;
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(smem + Tr::kOffRows);
  RowCoord* k_rows = q_rows + kCapQ;
  const uint32_t q_addr = sm90::smem_u32(smem + Tr::kOffQ), do_addr = sm90::smem_u32(smem + Tr::kOffDo);
  const uint32_t k_addr = sm90::smem_u32(smem + Tr::kOffK), v_addr = sm90::smem_u32(smem + Tr::kOffV);

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, quad = lane % 4;
  const int row0 = wg * 64 + warp * 16;  // this warp's first query row
  const int qb = blockIdx.x, head = blockIdx.y, bh = bh_base + blockIdx.y;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int64_t row_id = static_cast<int64_t>(bh) * nq + qb;
  const int32_t* ids = p.indices + row_id * p.kmax;
  int count = clamped_count(p.counts, row_id, p.kmax);
  // Out-of-range ids load block 0 (finite data) and are masked to P = 0.
  auto clamp_id = [nk](int id) { return in_range(id, nk) ? id : 0; };

  if (tid == 0) {
    sm90::mbar_init(q_full, 1);
    sm90::mbar_init(kv_full, 1);
    sm90::mbar_init(kv_full + 1, 1);
    sm90::mbar_init_fence();
  }
  init_row_tables<kCapQ, kCapK, kThreads>(q_rows, k_rows, p.geom_q, p.geom_k, tid);
  __syncthreads();

  auto issue_kv = [&](int stage, int id) {
    sm90::mbar_arrive_expect_tx(kv_full + stage, 2 * Tr::kTileK);
    tma_chunk<kCapK, kHeadDim>(smem + Tr::kOffK + stage * Tr::kTileK, &maps.k, kv_full + stage, p.geom_k, id, head);
    tma_chunk<kCapK, kHeadDim>(smem + Tr::kOffV + stage * Tr::kTileK, &maps.v, kv_full + stage, p.geom_k, id, head);
  };
  if (tid == 0 && count > 0) {
    sm90::mbar_arrive_expect_tx(q_full, 2 * Tr::kTileQ);
    tma_chunk<kCapQ, kHeadDim>(smem + Tr::kOffQ, &maps.q, q_full, p.geom_q, qb, head);
    tma_chunk<kCapQ, kHeadDim>(smem + Tr::kOffDo, &maps.dout, q_full, p.geom_q, qb, head);
    issue_kv(0, clamp_id(ids[0]));
  }
  const BlockOrigin q_origin = block_origin(p.geom_q, qb);
  int id = count > 0 ? ids[0] : 0;
  int next_id = count > 1 ? ids[1] : 0;

  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) bwd::row_stats(p, q_rows, q_origin, bh, row0 + g + 8 * hr, &lse2[hr], &delta[hr]);

  float acc_dq[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) acc_dq[i] = 0.f;
  if (count > 0) sm90::mbar_wait(q_full, 0);

  // Only shapes with partial edge blocks pay for locating each key block (three divisions).
  const bool k_edges = !p.geom_k.tiles_exactly();
  const BlockOrigin whole{0, p.geom_k.t, p.geom_k.h, p.geom_k.w, true};
  for (int n = 0; n < count; ++n) {
    const int stage = n & 1;
    sm90::mbar_wait(kv_full + stage, (n >> 1) & 1);
    __syncthreads();  // every warpgroup is past block n-1: its stage can be refilled
    const bool live = in_range(id, nk);
    const BlockOrigin origin = k_edges ? block_origin(p.geom_k, live ? id : 0) : whole;
    const int fetch_id = next_id;
    id = next_id;
    next_id = n + 2 < count ? ids[n + 2] : 0;
    const uint32_t k_tile = k_addr + stage * Tr::kTileK, v_tile = v_addr + stage * Tr::kTileK;

#pragma unroll
    for (int col0 = 0; col0 < kCapK; col0 += 64) {
      float s[32], dp[32];
      sm90::wgmma_fence();
      issue_nt<kDType, kHeadDim, kCapQ, kCapK>(s, q_addr, wg * 64, k_tile, col0);
      issue_nt<kDType, kHeadDim, kCapQ, kCapK>(dp, do_addr, wg * 64, v_tile, col0);
      sm90::wgmma_commit();
      // Thread 0 refills the other stage only now: issued before the products, its TMA set-up
      // held the other warps of its warpgroup at their first wgmma (a warpgroup-wide start).
      if (col0 == 0 && tid == 0 && n + 1 < count) issue_kv(stage ^ 1, clamp_id(fetch_id));
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
  }

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
  static constexpr int kTileQ = tile_bytes<kCapQ, kHeadDim>();
  static constexpr int kTileK = tile_bytes<kCapK, kHeadDim>();
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kTileK;
  static constexpr int kOffQ = kOffV + kTileK;        // [2]
  static constexpr int kOffDo = kOffQ + 2 * kTileQ;   // [2]
  static constexpr int kOffStats = kOffDo + 2 * kTileQ;  // lse [2][kCapQ], delta [2][kCapQ]
  static constexpr int kOffBars = kOffStats + 16 * kCapQ;  // kv_full, q_full[2]
  static constexpr int kOffRows = kOffBars + 32;
  static constexpr int kSmem = kOffRows + 8 * (kCapQ + kCapK) + 1024;
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(DkdvTraits<kDType, kHeadDim, kCapQ, kCapK>::kThreads, 1)
    dkdv_kernel(const __grid_constant__ BwdMaps maps, const BackwardParams p, const int bh_base) {
#if !BSA_SM90_ENABLED
  __trap();
#else
  using Tr = DkdvTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename ElementOf<kDType>::type;
  constexpr int kThreads = Tr::kThreads;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  float* s_lse = reinterpret_cast<float*>(smem + Tr::kOffStats);  // [2][kCapQ], raw (0 on padding rows)
  float* s_delta = s_lse + 2 * kCapQ;
  uint64_t* kv_full = reinterpret_cast<uint64_t*>(smem + Tr::kOffBars);
  uint64_t* q_full = kv_full + 1;
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(smem + Tr::kOffRows);
  RowCoord* k_rows = q_rows + kCapQ;
  const uint32_t k_addr = sm90::smem_u32(smem + Tr::kOffK), v_addr = sm90::smem_u32(smem + Tr::kOffV);
  const uint32_t q_addr = sm90::smem_u32(smem + Tr::kOffQ), do_addr = sm90::smem_u32(smem + Tr::kOffDo);

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32;
  const int quad = lane % 4;
  const int row0 = wg * 64 + warp * 16;  // this warp's first key row
  const int kb = blockIdx.x, head = blockIdx.y, bh = bh_base + blockIdx.y;
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();
  const int64_t list_len = static_cast<int64_t>(nq) * p.kmax;
  const int32_t* list = p.qlist + bh * list_len;
  const int32_t* offs = p.qoffsets + static_cast<int64_t>(bh) * (nk + 1);
  int begin = offs[kb], end = offs[kb + 1];
  begin = begin < 0 ? 0 : (begin > list_len ? int(list_len) : begin);
  end = end < begin ? begin : (end > list_len ? int(list_len) : end);
  const int len = end - begin;

  if (tid == 0) {
    sm90::mbar_init(kv_full, 1);
    sm90::mbar_init(q_full, 1);
    sm90::mbar_init(q_full + 1, 1);
    sm90::mbar_init_fence();
  }
  init_row_tables<kCapQ, kCapK, kThreads>(q_rows, k_rows, p.geom_q, p.geom_k, tid);
  __syncthreads();

  const float* lse_base = p.lse + static_cast<int64_t>(bh) * p.seq_q;
  const float* delta_base = p.delta + static_cast<int64_t>(bh) * p.seq_q;
  const BlockOrigin k_origin = block_origin(p.geom_k, kb);

  // Q and dO of query block `qb` by TMA (thread 0), its lse / delta rows by cp.async (all).
  auto load_query_block = [&](int buf, int qb) {
    qb = qb >= 0 && qb < nq ? qb : 0;  // the inverse index holds valid ids; stay in bounds anyway
    if (tid == 0) {
      sm90::mbar_arrive_expect_tx(q_full + buf, 2 * Tr::kTileQ);
      tma_chunk<kCapQ, kHeadDim>(smem + Tr::kOffQ + buf * Tr::kTileQ, &maps.q, q_full + buf, p.geom_q, qb, head);
      tma_chunk<kCapQ, kHeadDim>(smem + Tr::kOffDo + buf * Tr::kTileQ, &maps.dout, q_full + buf, p.geom_q, qb, head);
    }
    const BlockOrigin o = block_origin(p.geom_q, qb);
    for (int r = tid; r < kCapQ; r += kThreads) {
      const RowCoord rc = q_rows[r];
      const bool ok = o.full || row_inside(o, rc.packed);
      const int64_t at = ok ? o.token + rc.offset : 0;
      cp_async_4(s_lse + buf * kCapQ + r, lse_base + at, ok ? 4 : 0);
      cp_async_4(s_delta + buf * kCapQ + r, delta_base + at, ok ? 4 : 0);
    }
    cp_async_commit();
  };

  if (len > 0) {
    if (tid == 0) {
      sm90::mbar_arrive_expect_tx(kv_full, 2 * Tr::kTileK);
      tma_chunk<kCapK, kHeadDim>(smem + Tr::kOffK, &maps.k, kv_full, p.geom_k, kb, head);
      tma_chunk<kCapK, kHeadDim>(smem + Tr::kOffV, &maps.v, kv_full, p.geom_k, kb, head);
    }
    load_query_block(0, list[begin]);
  }
  int next_qb = len > 1 ? list[begin + 1] : 0;

  float acc_dk[kHeadDim / 2], acc_dv[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) acc_dk[i] = acc_dv[i] = 0.f;
  if (len > 0) sm90::mbar_wait(kv_full, 0);

  // dV += P^T dO and dK += dS^T Q of a block are left in flight: the next block's S^T and dP^T
  // are issued behind them, and they are waited for (wait<1>) only before their Q/dO buffer is
  // refilled or their P/dS registers are rewritten.
  uint32_t pf[4][4], df[4][4];
  for (int m = 0; m < len; ++m) {
    const int buf = m & 1;
    sm90::mbar_wait(q_full + buf, (m >> 1) & 1);
    cp_async_wait<0>();  // this thread's lse / delta rows of block m
    const uint32_t q_tile = q_addr + buf * Tr::kTileQ, do_tile = do_addr + buf * Tr::kTileQ;
    const float* lse_row = s_lse + buf * kCapQ;
    const float* delta_row = s_delta + buf * kCapQ;

#pragma unroll
    for (int col0 = 0; col0 < kCapQ; col0 += 64) {
      float s[32], dp[32];
      sm90::wgmma_fence();
      issue_nt<kDType, kHeadDim, kCapK, kCapQ>(s, k_addr, wg * 64, q_tile, col0);    // S^T
      issue_nt<kDType, kHeadDim, kCapK, kCapQ>(dp, v_addr, wg * 64, do_tile, col0);  // dP^T
      sm90::wgmma_commit();
      sm90::wgmma_wait<1>();  // the previous dV / dK products are done
      sm90::fence_registers(acc_dv);
      sm90::fence_registers(acc_dk);
      sm90::fence_registers(pf);
      sm90::fence_registers(df);
      if (col0 == 0) {
        // Every thread's lse / delta rows of block m are in, and every warpgroup is past block
        // m-1's products: its buffer takes block m+1, requested only now (thread 0's TMA set-up
        // before the products would hold its warpgroup's first wgmma).
        __syncthreads();
        if (m + 1 < len) {
          load_query_block(buf ^ 1, next_qb);
          next_qb = m + 2 < len ? list[begin + m + 2] : 0;
        }
      }
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
      pack_a<kDType>(pf, s);
      pack_a<kDType>(df, dp);
      sm90::wgmma_fence();
      issue_rn<kDType, kHeadDim, kCapQ>(acc_dv, pf, do_tile, col0);
      issue_rn<kDType, kHeadDim, kCapQ>(acc_dk, df, q_tile, col0);
      sm90::wgmma_commit();
    }
  }
  sm90::wgmma_wait<0>();
  sm90::fence_registers(acc_dv);
  sm90::fence_registers(acc_dk);
  sm90::fence_registers(pf);
  sm90::fence_registers(df);

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
cudaError_t run_backward_sm90(const BackwardParams& p, cudaStream_t stream, bool* launched) {
  using Delta = bwd::DeltaKernel<kDType, kHeadDim>;
  using Dq = bwd90::DqTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Dkdv = bwd90::DkdvTraits<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename ElementOf<kDType>::type;
  *launched = false;
  auto dq = bwd90::dq_kernel<kDType, kHeadDim, kCapQ, kCapK>;
  auto dkdv = bwd90::dkdv_kernel<kDType, kHeadDim, kCapQ, kCapK>;
  // Only sm_90a machine code runs these kernels (a build without 90a falls back to sm80).
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, dq) != cudaSuccess || attr.binaryVersion != 90) {
    cudaGetLastError();
    return cudaSuccess;
  }
  // Batch and head merge into the maps' last dimension when every batch stride is H head
  // strides; otherwise one launch per batch entry with its own maps.
  const int64_t B = p.batch, H = p.heads;
  auto merges = [&](int64_t bs, int64_t hs) { return B == 1 || bs == H * hs; };
  const bool merged = merges(p.q_batch_stride, p.q_head_stride) && merges(p.k_batch_stride, p.k_head_stride) &&
                      merges(p.v_batch_stride, p.v_head_stride) && merges(p.dout_batch_stride, p.dout_head_stride);
  const int64_t launches = merged ? 1 : B;
  const int64_t map_heads = merged ? B * H : H;
  std::vector<bwd90::BwdMaps> maps(static_cast<size_t>(launches));
  for (int64_t b = 0; b < launches; ++b) {
    const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride;
    const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride;
    const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride;
    const Element* d = static_cast<const Element*>(p.dout) + b * p.dout_batch_stride;
    if (!sm90::encode_chunk_map(&maps[b].q, q, kDType, kHeadDim, p.geom_q, p.q_row_stride, p.q_head_stride, map_heads) ||
        !sm90::encode_chunk_map(&maps[b].k, k, kDType, kHeadDim, p.geom_k, p.k_row_stride, p.k_head_stride, map_heads) ||
        !sm90::encode_chunk_map(&maps[b].v, v, kDType, kHeadDim, p.geom_k, p.v_row_stride, p.v_head_stride, map_heads) ||
        !sm90::encode_chunk_map(&maps[b].dout, d, kDType, kHeadDim, p.geom_q, p.dout_row_stride, p.dout_head_stride,
                                map_heads))
      return cudaSuccess;
  }
  cudaError_t err = bwd::allow_smem(dq, Dq::kSmem);
  if (err == cudaSuccess) err = bwd::allow_smem(dkdv, Dkdv::kSmem);
  if (err != cudaSuccess) return err;
  *launched = true;
  if (B * H == 0) return cudaSuccess;
  const dim3 delta_grid((p.seq_q + Delta::kRows - 1) / Delta::kRows, static_cast<unsigned>(B * H));
  bwd::delta_kernel<kDType, kHeadDim><<<delta_grid, Delta::kThreads, 0, stream>>>(p);
  for (int64_t b = 0; b < launches; ++b) {
    const int bh_base = static_cast<int>(b * H);
    dq<<<dim3(p.geom_q.num_blocks(), static_cast<unsigned>(map_heads)), Dq::kThreads, Dq::kSmem, stream>>>(maps[b], p,
                                                                                                         bh_base);
    dkdv<<<dim3(p.geom_k.num_blocks(), static_cast<unsigned>(map_heads)), Dkdv::kThreads, Dkdv::kSmem, stream>>>(
        maps[b], p, bh_base);
  }
  return cudaGetLastError();
}

}  // namespace bsa
