// Block-sparse flash-attention forward for sm_80 and newer (mma.sync, ldmatrix, cp.async).
//
// One CTA per (query block, batch*head); blockIdx.x is the query block, so the CTAs in
// flight at once belong to one head and share its K/V in L2. The Q tile is the whole
// query chunk, K/V tiles are one key chunk; rows are gathered from THW-ordered tensors
// with the chunk arithmetic of params.h (cp.async zero-fills padding / skipped rows).
// Two kernels (run_forward picks by key capacity):
// * forward_kernel (128-key chunks): one warp per 16 query rows, Q in registers, K/V
//   double buffered so block n+1 streams in while block n is computed;
// * forward_wide_kernel (64-key chunks): one warp per 32 query rows, one or two K/V
//   buffers, see its comment.
//
// Shared memory tiles and their loaders: bsa/tile_sm80.cuh.
#pragma once

#include <cmath>

#include "bsa/api.h"
#include "bsa/params.h"
#include "bsa/ptx.cuh"
#include "bsa/tile_sm80.cuh"

namespace bsa {
namespace fwd {

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct Kernel {
  using Element = typename ElementOf<kDType>::type;
  static constexpr int kWarps = kCapQ / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kSmem = forward_smem_bytes_narrow(kHeadDim, kCapQ, kCapK);
  static constexpr int kMinBlocks = kCapQ == 64 ? 2 : 1;
  static_assert(kHeadDim % 16 == 0 && kCapK % 16 == 0 && kCapQ % 16 == 0, "tile shapes are multiples of 16");
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(Kernel<kDType, kHeadDim, kCapQ, kCapK>::kThreads,
                                  Kernel<kDType, kHeadDim, kCapQ, kCapK>::kMinBlocks)
    forward_kernel(const ForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // cp.async / bf16 mma need sm_80; the binding never launches this below it
#else
  using K = Kernel<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename K::Element;
  constexpr int kThreads = K::kThreads;
  constexpr int kNT = kCapK / 8;      // n-tiles of S per warp
  constexpr int kDT = kHeadDim / 8;   // n-tiles of O per warp
  constexpr int kKQ = kHeadDim / 16;  // k-steps of Q K^T
  constexpr int kKP = kCapK / 16;     // k-steps of P V

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + kCapQ * kHeadDim;         // [2][kCapK][kHeadDim]
  Element* sV = sK + 2 * kCapK * kHeadDim;     // [2][kCapK][kHeadDim]
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(sV + 2 * kCapK * kHeadDim);
  RowCoord* k_rows = q_rows + kCapQ;
  uint32_t* k_off = reinterpret_cast<uint32_t*>(k_rows + kCapK);  // row offsets in bytes (row_table_slot)
  uint32_t* v_off = k_off + kCapK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
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
  const Element* k_base = head_base<Element>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const Element* v_base = head_base<Element>(p.v, p.v_batch_stride, p.v_head_stride, b, h);
  const BlockOrigin q_origin = block_origin(p.geom_q, qb);

  load_tile<Element, kHeadDim, kCapQ, kThreads>(sQ, q_base, p.q_row_stride, q_rows, q_origin, true, tid);

  // Out-of-range ids are clamped for addressing and fully masked: they contribute nothing.
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

  uint32_t q_frag[kKQ][4];
  float acc_o[kDT][4];
#pragma unroll
  for (int j = 0; j < kDT; ++j) acc_o[j][0] = acc_o[j][1] = acc_o[j][2] = acc_o[j][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // running max of raw scores
  float row_sum[2] = {0.f, 0.f};              // per-thread partial sums, reduced at the end

  const int g = lane >> 2, c = lane & 3;
  const int warp_row = warp * 16;

  for (int n = 0; n < count; ++n) {
    const int stage = n & 1;
    // One barrier per block: K and V of block n have landed for every thread, and every warp
    // has finished block n-1, so its stage can be refilled with block n+1 right away.
    cp_async_wait<0>();
    __syncthreads();
    const int nid = next_id;
    const bool nlive = in_range(nid, nk);
    const BlockOrigin norigin = block_origin(p.geom_k, nlive ? nid : 0);
    if (n + 1 < count) {
      Element* dk = sK + (stage ^ 1) * kCapK * kHeadDim;
      Element* dv = sV + (stage ^ 1) * kCapK * kHeadDim;
      load_block_tile<Element, kHeadDim, kCapK, kThreads>(dk, k_base, p.k_row_stride, k_off, table_ok, k_rows,
                                                          norigin, nlive, tid);
      load_block_tile<Element, kHeadDim, kCapK, kThreads>(dv, v_base, p.v_row_stride, v_off, table_ok, k_rows,
                                                          norigin, nlive, tid);
      // The id after next is fetched now so its latency hides behind this block's math.
      next_id = n + 2 < count ? ids[n + 2] : 0;
    }
    cp_async_commit();

    if (n == 0) {
#pragma unroll
      for (int kk = 0; kk < kKQ; ++kk)
        ldmatrix_x4(q_frag[kk], sQ + swizzle<kHeadDim>(warp_row + (lane & 15), kk * 16 + (lane >> 4) * 8));
    }

    const Element* k_tile = sK + stage * kCapK * kHeadDim;
    float acc_s[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) acc_s[j][0] = acc_s[j][1] = acc_s[j][2] = acc_s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKQ; ++kk) {
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t kf[4];
        const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
        ldmatrix_x4(kf, k_tile + swizzle<kHeadDim>(key, kk * 16 + ((lane >> 3) & 1) * 8));
        mma_16816<kDType>(acc_s[2 * np], q_frag[kk], kf[0], kf[1]);
        mma_16816<kDType>(acc_s[2 * np + 1], q_frag[kk], kf[2], kf[3]);
      }
    }

    if (!(live && origin.full)) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j * 8 + 2 * c + e;
          if (!(live && row_inside(origin, k_rows[col].packed))) acc_s[j][e] = acc_s[j][e + 2] = -INFINITY;
        }
      }
    }

    float corr[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      // Serial max/sum: tree temporaries cost registers that the 128-key tiles cannot spare.
      float mx = row_max[hr];
#pragma unroll
      for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(acc_s[j][2 * hr], acc_s[j][2 * hr + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
      // A row with every key masked so far keeps max -inf; subtracting 0 then keeps p = 0, not NaN.
      const float base = mx == -INFINITY ? 0.f : mx * p.scale_log2;
      const float old = row_max[hr];
      corr[hr] = old == mx ? 1.f : (old == -INFINITY ? 0.f : exp2_approx(old * p.scale_log2 - base));
      row_max[hr] = mx;
      row_sum[hr] *= corr[hr];
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
        acc_s[j][2 * hr] = exp2_approx(fmaf(acc_s[j][2 * hr], p.scale_log2, -base));
        acc_s[j][2 * hr + 1] = exp2_approx(fmaf(acc_s[j][2 * hr + 1], p.scale_log2, -base));
        row_sum[hr] += acc_s[j][2 * hr] + acc_s[j][2 * hr + 1];
      }
    }
    // The running max settles after a few blocks: skip the O rescale when no row of the warp moved.
    if (__any_sync(0xffffffff, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int j = 0; j < kDT; ++j) {
        acc_o[j][0] *= corr[0];
        acc_o[j][1] *= corr[0];
        acc_o[j][2] *= corr[1];
        acc_o[j][3] *= corr[1];
      }
    }

    const Element* v_tile = sV + stage * kCapK * kHeadDim;
#pragma unroll
    for (int kk = 0; kk < kKP; ++kk) {
      uint32_t pf[4];
      pf[0] = ElementOf<kDType>::pack(acc_s[2 * kk][0], acc_s[2 * kk][1]);
      pf[1] = ElementOf<kDType>::pack(acc_s[2 * kk][2], acc_s[2 * kk][3]);
      pf[2] = ElementOf<kDType>::pack(acc_s[2 * kk + 1][0], acc_s[2 * kk + 1][1]);
      pf[3] = ElementOf<kDType>::pack(acc_s[2 * kk + 1][2], acc_s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t vf[4];
        const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        ldmatrix_x4_trans(vf, v_tile + swizzle<kHeadDim>(key, dp * 16 + (lane >> 4) * 8));
        mma_16816<kDType>(acc_o[2 * dp], pf, vf[0], vf[1]);
        mma_16816<kDType>(acc_o[2 * dp + 1], pf, vf[2], vf[3]);
      }
    }
    live = nlive;
    origin = norigin;
  }

  // Epilogue: normalise, stage O through the (now free) Q rows of this warp, store THW rows.
  cp_async_wait<0>();
  __syncthreads();
  float lse_row[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const RowEnd end = finish_row(row_sum[hr], row_max[hr], p.scale_log2);
    const float inv = end.inv;
    lse_row[hr] = end.lse;
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
      const int row = warp_row + g + 8 * hr;
      const uint32_t packed = ElementOf<kDType>::pack(acc_o[j][2 * hr] * inv, acc_o[j][2 * hr + 1] * inv);
      *reinterpret_cast<uint32_t*>(sQ + swizzle<kHeadDim>(row, j * 8) + 2 * c) = packed;
    }
  }
  __syncwarp();

  Element* out_base = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  constexpr int kChunks = kHeadDim / 8;
#pragma unroll
  for (int it = 0; it < 16 * kChunks / 32; ++it) {
    const int i = lane + it * 32;
    const int row = warp_row + i / kChunks, ch = i % kChunks;
    const RowCoord rc = q_rows[row];
    if (q_origin.full || row_inside(q_origin, rc.packed)) {
      const int4 val = *reinterpret_cast<const int4*>(sQ + swizzle<kHeadDim>(row, ch * 8));
      *reinterpret_cast<int4*>(out_base + static_cast<int64_t>(q_origin.token + rc.offset) * p.out_row_stride +
                               ch * 8) = val;
    }
  }
  if (c == 0) {
    float* lse_base = p.lse + static_cast<int64_t>(bh) * p.seq_q;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const RowCoord rc = q_rows[warp_row + g + 8 * hr];
      if (q_origin.full || row_inside(q_origin, rc.packed)) lse_base[q_origin.token + rc.offset] = lse_row[hr];
    }
  }
#endif
}

// Variant for 64-row key chunks: 32 query rows per warp (two m16 tiles share every K/V
// fragment, halving ldmatrix traffic and doubling independent mma chains), Q read from
// smem. With kKvBuffers = 2, single K and V buffers pipelined FlashAttention-2 style (V_n
// streams in during Q K_n^T, K_{n+1} during softmax and P V_n): 48 KB of smem for 64x64
// tiles, 4 CTAs an SM on an H100 but 3 on an A100. With kKvBuffers = 1, K_n and V_n take
// turns in one buffer (V_n streams in during the softmax, K_{n+1} only after P V_n): 32 KB,
// 4 CTAs in an A100's 164 KB, where the other CTAs of the SM hide the exposed K loads.
// run_forward picks by the device's shared memory (wide_forward_kv_buffers).
template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct WideKernel {
  using Element = typename ElementOf<kDType>::type;
  static constexpr int kWarps = kCapQ / 32;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMinBlocks = kCapQ == 64 ? 4 : 2;
  static_assert(kCapK == 64, "the wide variant holds one 64-key S tile per m-tile");
};

template <DType kDType, int kHeadDim, int kCapQ, int kCapK, int kKvBuffers>
__global__ void __launch_bounds__(WideKernel<kDType, kHeadDim, kCapQ, kCapK>::kThreads,
                                  WideKernel<kDType, kHeadDim, kCapQ, kCapK>::kMinBlocks)
    forward_wide_kernel(const ForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using K = WideKernel<kDType, kHeadDim, kCapQ, kCapK>;
  using Element = typename K::Element;
  static_assert(kKvBuffers == 1 || kKvBuffers == 2, "K/V tiles take one buffer in turn, or one each");
  constexpr bool kOneBuf = kKvBuffers == 1;
  constexpr int kThreads = K::kThreads;
  constexpr int kNT = kCapK / 8;
  constexpr int kDT = kHeadDim / 8;
  constexpr int kKQ = kHeadDim / 16;
  constexpr int kKP = kCapK / 16;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + kCapQ * kHeadDim;
  Element* sV = kOneBuf ? sK : sK + kCapK * kHeadDim;
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(sV + kCapK * kHeadDim);
  RowCoord* k_rows = q_rows + kCapQ;
  uint32_t* k_off = reinterpret_cast<uint32_t*>(k_rows + kCapK);  // row offsets in bytes (row_table_slot)
  uint32_t* v_off = k_off + kCapK;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
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
  const Element* k_base = head_base<Element>(p.k, p.k_batch_stride, p.k_head_stride, b, h);
  const Element* v_base = head_base<Element>(p.v, p.v_batch_stride, p.v_head_stride, b, h);
  const BlockOrigin q_origin = block_origin(p.geom_q, qb);

  load_tile<Element, kHeadDim, kCapQ, kThreads>(sQ, q_base, p.q_row_stride, q_rows, q_origin, true, tid);
  // Out-of-range ids are clamped for addressing and fully masked: they contribute nothing.
  const int first = count > 0 ? ids[0] : 0;
  bool live = in_range(first, nk);
  BlockOrigin origin = block_origin(p.geom_k, live ? first : 0);
  auto load_kv = [&](Element* dst, const Element* base, int64_t stride, const uint32_t* off, const BlockOrigin& o,
                     bool ok) {
    load_block_tile<Element, kHeadDim, kCapK, kThreads>(dst, base, stride, off, table_ok, k_rows, o, ok, tid);
  };
  if (count > 0) load_kv(sK, k_base, p.k_row_stride, k_off, origin, live);
  cp_async_commit();
  int next_id = count > 1 ? ids[1] : 0;

  float acc_o[2][kDT][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int j = 0; j < kDT; ++j) acc_o[mt][j][0] = acc_o[mt][j][1] = acc_o[mt][j][2] = acc_o[mt][j][3] = 0.f;
  float row_max[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};  // [mt*2 + hr], raw scores
  float row_sum[4] = {0.f, 0.f, 0.f, 0.f};

  const int g = lane >> 2, c = lane & 3;
  const int warp_row = warp * 32;

  for (int n = 0; n < count; ++n) {
    cp_async_wait<0>();  // K_n (and Q) landed
    __syncthreads();     // ... for every thread; every warp is also done with V_{n-1}
    if constexpr (!kOneBuf) {
      load_kv(sV, v_base, p.v_row_stride, v_off, origin, live);
      cp_async_commit();
    }

    float acc_s[2][kNT][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int j = 0; j < kNT; ++j) acc_s[mt][j][0] = acc_s[mt][j][1] = acc_s[mt][j][2] = acc_s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKQ; ++kk) {
      uint32_t qf[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
        ldmatrix_x4(qf[mt], sQ + swizzle<kHeadDim>(warp_row + mt * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t kf[4];
        const int key = np * 16 + (lane >> 4) * 8 + (lane & 7);
        ldmatrix_x4(kf, sK + swizzle<kHeadDim>(key, kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<kDType>(acc_s[mt][2 * np], qf[mt], kf[0], kf[1]);
          mma_16816<kDType>(acc_s[mt][2 * np + 1], qf[mt], kf[2], kf[3]);
        }
      }
    }

    if constexpr (kOneBuf) {
      __syncthreads();  // every warp is done reading K_n: V_n may take its buffer
      load_kv(sV, v_base, p.v_row_stride, v_off, origin, live);
      cp_async_commit();
    }
    if (!(live && origin.full)) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = j * 8 + 2 * c + e;
          if (!(live && row_inside(origin, k_rows[col].packed))) {
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) acc_s[mt][j][e] = acc_s[mt][j][e + 2] = -INFINITY;
          }
        }
      }
    }

    float corr[4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int ri = mt * 2 + hr;
        float t[kNT];
#pragma unroll
        for (int j = 0; j < kNT; ++j) t[j] = fmaxf(acc_s[mt][j][2 * hr], acc_s[mt][j][2 * hr + 1]);
#pragma unroll
        for (int w = kNT / 2; w >= 1; w /= 2)
#pragma unroll
          for (int j = 0; j < w; ++j) t[j] = fmaxf(t[j], t[j + w]);
        float mx = fmaxf(row_max[ri], t[0]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        // A row with every key masked so far keeps max -inf; subtracting 0 then keeps p = 0, not NaN.
        const float base = mx == -INFINITY ? 0.f : mx * p.scale_log2;
        const float old = row_max[ri];
        corr[ri] = old == mx ? 1.f : (old == -INFINITY ? 0.f : exp2_approx(old * p.scale_log2 - base));
        row_max[ri] = mx;
#pragma unroll
        for (int j = 0; j < kNT; ++j) {
          acc_s[mt][j][2 * hr] = exp2_approx(fmaf(acc_s[mt][j][2 * hr], p.scale_log2, -base));
          acc_s[mt][j][2 * hr + 1] = exp2_approx(fmaf(acc_s[mt][j][2 * hr + 1], p.scale_log2, -base));
          t[j] = acc_s[mt][j][2 * hr] + acc_s[mt][j][2 * hr + 1];
        }
#pragma unroll
        for (int w = kNT / 2; w >= 1; w /= 2)
#pragma unroll
          for (int j = 0; j < w; ++j) t[j] += t[j + w];
        row_sum[ri] = fmaf(row_sum[ri], corr[ri], t[0]);
      }
    }
    // The running max settles after a few blocks: skip the O rescale when no row of the warp moved.
    if (__any_sync(0xffffffff, corr[0] != 1.f || corr[1] != 1.f || corr[2] != 1.f || corr[3] != 1.f)) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int j = 0; j < kDT; ++j) {
          acc_o[mt][j][0] *= corr[2 * mt];
          acc_o[mt][j][1] *= corr[2 * mt];
          acc_o[mt][j][2] *= corr[2 * mt + 1];
          acc_o[mt][j][3] *= corr[2 * mt + 1];
        }
    }

    cp_async_wait<0>();  // V_n landed
    __syncthreads();     // ... for every thread; every warp is also done reading K_n
    // Block n+1 becomes the current one (P V_n below needs neither `live` nor `origin`), and its
    // K tile is requested: here with two buffers, after P V_n (which reads the one) with one.
    const auto request_next_k = [&]() {
      live = in_range(next_id, nk);
      origin = block_origin(p.geom_k, live ? next_id : 0);
      if (n + 1 < count) {
        load_kv(sK, k_base, p.k_row_stride, k_off, origin, live);
        next_id = n + 2 < count ? ids[n + 2] : 0;
      }
      cp_async_commit();
    };
    if constexpr (!kOneBuf) request_next_k();

#pragma unroll
    for (int kk = 0; kk < kKP; ++kk) {
      uint32_t pf[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        pf[mt][0] = ElementOf<kDType>::pack(acc_s[mt][2 * kk][0], acc_s[mt][2 * kk][1]);
        pf[mt][1] = ElementOf<kDType>::pack(acc_s[mt][2 * kk][2], acc_s[mt][2 * kk][3]);
        pf[mt][2] = ElementOf<kDType>::pack(acc_s[mt][2 * kk + 1][0], acc_s[mt][2 * kk + 1][1]);
        pf[mt][3] = ElementOf<kDType>::pack(acc_s[mt][2 * kk + 1][2], acc_s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t vf[4];
        const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        ldmatrix_x4_trans(vf, sV + swizzle<kHeadDim>(key, dp * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          mma_16816<kDType>(acc_o[mt][2 * dp], pf[mt], vf[0], vf[1]);
          mma_16816<kDType>(acc_o[mt][2 * dp + 1], pf[mt], vf[2], vf[3]);
        }
      }
    }
    if constexpr (kOneBuf) {
      __syncthreads();  // every warp is done reading V_n: K_{n+1} may take its buffer
      request_next_k();
    }
  }

  // Epilogue: normalise, stage O through this warp's own Q rows, store THW rows.
  cp_async_wait<0>();
  __syncthreads();
  float lse_row[4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int ri = mt * 2 + hr;
      const RowEnd end = finish_row(row_sum[ri], row_max[ri], p.scale_log2);
      const float inv = end.inv;
      lse_row[ri] = end.lse;
      const int row = warp_row + mt * 16 + g + 8 * hr;
#pragma unroll
      for (int j = 0; j < kDT; ++j) {
        const uint32_t packed = ElementOf<kDType>::pack(acc_o[mt][j][2 * hr] * inv, acc_o[mt][j][2 * hr + 1] * inv);
        *reinterpret_cast<uint32_t*>(sQ + swizzle<kHeadDim>(row, j * 8) + 2 * c) = packed;
      }
    }
  }
  __syncwarp();

  Element* out_base = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  constexpr int kChunks = kHeadDim / 8;
#pragma unroll
  for (int it = 0; it < 32 * kChunks / 32; ++it) {
    const int i = lane + it * 32;
    const int row = warp_row + i / kChunks, ch = i % kChunks;
    const RowCoord rc = q_rows[row];
    if (q_origin.full || row_inside(q_origin, rc.packed)) {
      const int4 val = *reinterpret_cast<const int4*>(sQ + swizzle<kHeadDim>(row, ch * 8));
      *reinterpret_cast<int4*>(out_base + static_cast<int64_t>(q_origin.token + rc.offset) * p.out_row_stride +
                               ch * 8) = val;
    }
  }
  if (c == 0) {
    float* lse_base = p.lse + static_cast<int64_t>(bh) * p.seq_q;
#pragma unroll
    for (int ri = 0; ri < 4; ++ri) {
      const RowCoord rc = q_rows[warp_row + (ri >> 1) * 16 + g + 8 * (ri & 1)];
      if (q_origin.full || row_inside(q_origin, rc.packed)) lse_base[q_origin.token + rc.offset] = lse_row[ri];
    }
  }
#endif
}

}  // namespace fwd

// Key chunks of 64 rows take the wide variant; 128-row key chunks the 16-rows-per-warp one
// (two 32x128 S tiles would not fit in registers). Keep in step with forward_smem_bytes (api.h),
// whose 64-key case is forward_smem_bytes_wide with the buffers run_forward picks.
template <int kCapK>
constexpr bool kUseWideForward = kCapK == 64;

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_forward(const ForwardParams& params, cudaStream_t stream) {
  const dim3 grid(params.geom_q.num_blocks(), params.batch * params.heads);
  if constexpr (kUseWideForward<kCapK>) {
    using K = fwd::WideKernel<kDType, kHeadDim, kCapQ, kCapK>;
    const int buffers = params.kv_buffers != 0 ? params.kv_buffers
                                               : wide_forward_kv_buffers(kHeadDim, kCapQ, kCapK, K::kMinBlocks,
                                                                         current_device_smem_per_sm());
    auto kernel = buffers == 1 ? fwd::forward_wide_kernel<kDType, kHeadDim, kCapQ, kCapK, 1>
                               : fwd::forward_wide_kernel<kDType, kHeadDim, kCapQ, kCapK, 2>;
    const int smem = forward_smem_bytes_wide(kHeadDim, kCapQ, kCapK, buffers);
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    if (grid.x == 0 || grid.y == 0) return cudaSuccess;
    kernel<<<grid, K::kThreads, smem, stream>>>(params);
  } else {
    using K = fwd::Kernel<kDType, kHeadDim, kCapQ, kCapK>;
    auto kernel = fwd::forward_kernel<kDType, kHeadDim, kCapQ, kCapK>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, K::kSmem);
    if (err != cudaSuccess) return err;
    if (grid.x == 0 || grid.y == 0) return cudaSuccess;
    kernel<<<grid, K::kThreads, K::kSmem, stream>>>(params);
  }
  return cudaGetLastError();
}

}  // namespace bsa
