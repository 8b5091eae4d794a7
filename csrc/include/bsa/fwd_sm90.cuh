// Block-sparse flash-attention forward for Hopper (sm_90a): TMA + mbarrier + wgmma,
// warp-specialised.
//
// CTA = 1 producer warpgroup + 2 or 3 consumer warpgroups. Warpgroup 0 is the producer: one
// elected thread per "ring" issues TMA copies of whole 3D chunks (a box (64, w, h, t, 1) of the
// 5-D view (D, W, H, T, heads) of a THW-ordered tensor, so rows land in chunk order with no
// layout copy; out-of-bounds rows of partial edge chunks arrive as zeros). Consumers take 64
// query rows each:
//  * capacity-64 query blocks: each consumer owns a different query block with its own key
//    list and its own K/V ring (independent streams: while one warpgroup runs softmax the
//    others' wgmmas keep the tensor cores busy). With 64-key blocks there are three consumers
//    at 160 registers; at head dim 128 their rings then hold one K stage and two V stages;
//  * capacity-128 query blocks: two consumers share one ring (one K/V copy feeds 128 rows)
//    and take turns issuing their wgmmas (FlashAttention-3-style ping-pong on named barriers).
// Inside a consumer the loop is software-pipelined: S_{n+1} = Q K_{n+1}^T and O += P_n V_n are
// issued back to back, softmax of S_{n+1} runs while P_n V_n is still on the tensor cores.
// K and V have separate full/empty barriers, so K_{n+1} streams in while P_n V_n runs.
// The grid is (groups of kRings query blocks, heads): blockIdx.x fastest, so CTAs in flight share
// one head's K/V in L2; the slots take the query blocks in the launch order of bsa/schedule.cuh
// (descending counts: a CTA's lists are about as long, the longest run first). `out`
// leaves through a TMA store of the same box (edge rows clipped).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include <cuda.h>
#include <cuda_runtime.h>

#include "bsa/params.h"
#include "bsa/ptx.cuh"
#include "bsa/sm90_api.cuh"
#include "bsa/sm90_ptx.cuh"
#include "bsa/sm90_tma.cuh"

namespace bsa {
namespace sm90 {

// Consumer warpgroups per CTA for capacity-64 query blocks. Three keep the tensor cores busier
// than two (one warpgroup's softmax no longer leaves them idle half the time), at the price of
// a shallower K ring; -DBSA_FWD_MAX_CONSUMERS=2 builds the two-consumer kernel for comparison.
#ifndef BSA_FWD_MAX_CONSUMERS
#define BSA_FWD_MAX_CONSUMERS 3
#endif

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
struct ForwardTraits {
  static constexpr int kHalves = kHeadDim / 64;          // 64-column (128-byte) boxes per row
  static constexpr int kQBytes = kCapQ * kHeadDim * 2;   // one ring's query tile
  static constexpr int kTileBytes = kCapK * kHeadDim * 2;  // one K or one V tile
  // Capacity-64 query blocks: one ring (query block, K and V stages) per consumer. Three
  // consumers for 64-key blocks (measured at head dims 128 and 64, docs/PERF.md; their 160
  // registers hold O, S and P there, not the S and P of 128-key blocks); two for 128-key
  // blocks. Capacity 128: two consumers, one ring.
  static constexpr int kConsumers = kCapQ == 64 && kCapK == 64 ? BSA_FWD_MAX_CONSUMERS : 2;
  static constexpr int kRings = kCapQ == 64 ? kConsumers : 1;
  static constexpr int kConsumersPerRing = kConsumers / kRings;
  static constexpr int kThreads = 128 * (kConsumers + 1);
  static constexpr int kSmemLimit = 227 * 1024;
  static constexpr int kReserve = 2048;  // barriers, row tables, alignment slack
  // Per ring: up to 4 stages of K and of V; where not even two of each fit, one K stage and two
  // V stages (K_{n+2} then streams in during the softmax of block n+1 and the rescale).
  static constexpr int kRingBytes = (kSmemLimit - kRings * kQBytes - kReserve) / kRings;
  static constexpr int kPairsFit = kRingBytes / (2 * kTileBytes);
  static constexpr int kStagesK = kPairsFit >= 2 ? (kPairsFit > 4 ? 4 : kPairsFit) : 1;
  static constexpr int kStagesV = kPairsFit >= 2 ? kStagesK : (kRingBytes >= 3 * kTileBytes ? 2 : 1);
  static_assert(kPairsFit >= 1, "tiles do not fit in shared memory");
  static_assert(kHeadDim % 64 == 0 && kCapQ % 64 == 0 && kCapK % 64 == 0, "64-multiples only");

  // Byte offsets from the 1024-aligned base (every tile 1024-aligned for the 128B swizzle).
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kRings * kQBytes;
  static constexpr int kOffV = kOffK + kRings * kStagesK * kTileBytes;
  static constexpr int kOffBars = kOffV + kRings * kStagesV * kTileBytes;
  static constexpr int kBarsPerRing = 2 * kStagesK + 2 * kStagesV + 1;
  static constexpr int kNumBars = kRings * kBarsPerRing;
  static constexpr int kOffKRows = kOffBars + 8 * kNumBars;
  static constexpr int kOffQRows = kOffKRows + 4 * kCapK;
  static constexpr int kSmemBytes = kOffQRows + 8 * kCapQ + 1024;
  static_assert(kSmemBytes <= kSmemLimit, "shared memory");

  // setmaxnreg split of the 64K registers: producer warpgroup small, consumers the rest.
  static constexpr int kProducerRegs = kConsumers == 3 ? 24 : 40;
  static constexpr int kConsumerRegs = kConsumers == 3 ? 160 : 232;
  static_assert(128 * (kProducerRegs + kConsumers * kConsumerRegs) <= 65536, "register file");
};

// Barrier set of one ring, laid out full_k[kStagesK] | full_v[kStagesV] | empty_k[kStagesK] |
// empty_v[kStagesV] | q_full.
template <int kStagesK, int kStagesV>
struct Ring {
  uint64_t* bars;
  __device__ uint64_t* full_k(int s) const { return bars + s; }
  __device__ uint64_t* full_v(int s) const { return bars + kStagesK + s; }
  __device__ uint64_t* empty_k(int s) const { return bars + kStagesK + kStagesV + s; }
  __device__ uint64_t* empty_v(int s) const { return bars + 2 * kStagesK + kStagesV + s; }
  __device__ uint64_t* q_full() const { return bars + 2 * kStagesK + 2 * kStagesV; }
};

// Releases a stage: one arrive per warp once all its lanes are past their reads.
__device__ __forceinline__ void release(uint64_t* bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

// The query block that ring slot `slot` (blockIdx.x * kRings + ring) runs: the slot-th entry of
// the launch order (descending counts, so a CTA's lists are about as long), or nq for none.
__device__ __forceinline__ int query_block_of(const ForwardParams& p, int bh, int nq, int slot) {
  if (slot >= nq) return nq;
  const int qb = p.order != nullptr ? p.order[static_cast<int64_t>(bh) * nq + slot] : slot;
  return in_range(qb, nq) ? qb : nq;
}

// Pairwise (tree) reduction of t[0..W): short dependency chains, constant indices only.
template <int W, typename Op>
__device__ __forceinline__ float tree_reduce(float* t, Op op) {
  if constexpr (W == 1) {
    return t[0];
  } else {
#pragma unroll
    for (int j = 0; j < W / 2; ++j) t[j] = op(t[j], t[j + W / 2]);
    return tree_reduce<W / 2>(t, op);
  }
}

// How far (log2 units) a row's max may rise before the running max and O are rescaled
// (128-key tiles).
constexpr float kLazyMaxLog2 = 8.f;

// Online softmax over one S tile (rows g and g+8 of this thread's warp); returns O's rescale.
template <int kCapK>
__device__ __forceinline__ void online_softmax(float (&s)[kCapK / 2], float (&row_max)[2], float (&row_sum)[2],
                                               float (&corr)[2], float scale_log2) {
  constexpr int kNT = kCapK / 8;
  static_assert(kNT == 8 || kNT == 16, "key tiles of 64 or 128 rows");
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    // Tree reductions keep the dependency chains short.
    float t[kNT];
#pragma unroll
    for (int j = 0; j < kNT; ++j) t[j] = fmaxf(s[4 * j + 2 * hr], s[4 * j + 2 * hr + 1]);
    float mx = fmaxf(row_max[hr], tree_reduce<kNT>(t, [](float a, float b) { return fmaxf(a, b); }));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
    // Keep the running max while the new one exceeds it by at most kLazyMaxLog2 in log2 units:
    // p then stays <= 2^8 (fp32 sums have room; bf16/fp16 P keeps its relative precision) and
    // O needs no rescale. out and lse use the same max, so the result is unchanged. Measured on
    // H100: -3% at 128-key tiles (W720s-c128), +-1% at 64-key tiles, which keep the exact max.
    if (kCapK == 128 && (mx - row_max[hr]) * scale_log2 <= kLazyMaxLog2) mx = row_max[hr];
    // A row whose keys were all masked so far keeps max -inf: subtracting 0 keeps p = 0, not NaN.
    const float base = mx == -INFINITY ? 0.f : mx * scale_log2;
    const float old = row_max[hr];
    corr[hr] = old == mx ? 1.f : (old == -INFINITY ? 0.f : exp2_approx(old * scale_log2 - base));
    row_max[hr] = mx;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      s[4 * j + 2 * hr] = exp2_approx(fmaf(s[4 * j + 2 * hr], scale_log2, -base));
      s[4 * j + 2 * hr + 1] = exp2_approx(fmaf(s[4 * j + 2 * hr + 1], scale_log2, -base));
      t[j] = s[4 * j + 2 * hr] + s[4 * j + 2 * hr + 1];
    }
    row_sum[hr] = fmaf(row_sum[hr], corr[hr], tree_reduce<kNT>(t, [](float a, float b) { return a + b; }));
  }
}

// Padding keys of a partial edge block score -inf (TMA filled their rows with zeros).
template <int kCapK>
__device__ __forceinline__ void mask_partial_block(float (&s)[kCapK / 2], const int* k_packed, const BlockOrigin& o,
                                                   int quad) {
#pragma unroll
  for (int j = 0; j < kCapK / 8; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (!row_inside(o, k_packed[8 * j + 2 * quad + e])) s[4 * j + e] = s[4 * j + 2 + e] = -INFINITY;
}

// S tile (fp32 accumulators) -> bf16/fp16 A fragments of the P V wgmma (same register layout).
template <DType kDType, int kCapK>
__device__ __forceinline__ void pack_p(uint32_t (&pf)[kCapK / 16][4], const float (&s)[kCapK / 2]) {
#pragma unroll
  for (int kk = 0; kk < kCapK / 16; ++kk) {
    pf[kk][0] = ElementOf<kDType>::pack(s[8 * kk + 0], s[8 * kk + 1]);
    pf[kk][1] = ElementOf<kDType>::pack(s[8 * kk + 2], s[8 * kk + 3]);
    pf[kk][2] = ElementOf<kDType>::pack(s[8 * kk + 4], s[8 * kk + 5]);
    pf[kk][3] = ElementOf<kDType>::pack(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Issues S = Q K^T for one key tile (kHeadDim/16 k-steps of 16 columns).
template <DType kDType, int kHeadDim, int kCapK, int kQRows>
__device__ __forceinline__ void issue_scores(float (&s)[kCapK / 2], uint32_t q_addr, uint32_t k_addr) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // Within a 128-byte swizzle row the k-step is a 32-byte start offset; halves are whole boxes.
    const uint32_t qa = q_addr + (kk / 4) * kQRows * 128 + (kk % 4) * 32;
    const uint32_t ka = k_addr + (kk / 4) * kCapK * 128 + (kk % 4) * 32;
    wgmma_ss<kDType, kCapK>(s, smem_desc_sw128(qa, 16), smem_desc_sw128(ka, 16), kk > 0);
  }
  wgmma_commit();
}

// Issues O += P V for one value tile: 16 keys (2048 bytes of rows) per k-step.
template <DType kDType, int kHeadDim, int kCapK>
__device__ __forceinline__ void issue_pv(float (&o)[kHeadDim / 2], const uint32_t (&pf)[kCapK / 16][4],
                                         uint32_t v_addr) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kCapK / 16; ++kk)
    wgmma_rs<kDType, kHeadDim, true>(o, pf[kk], smem_desc_sw128(v_addr + kk * 2048, kCapK * 128), 1);
  wgmma_commit();
}

// Debug-only cycle accounting of the consumer loop, per phase, summed over the first thread of
// every consumer warpgroup (tools/device/fwd_phases.cu defines BSA_FWD_PHASE_TIMING and reads
// fwd_phase_cycles); without the macro it compiles to nothing.
#ifdef BSA_FWD_PHASE_TIMING
__device__ unsigned long long fwd_phase_cycles[8];
struct PhaseClock {
  long long last;
  unsigned long long acc[8];
  static __device__ long long now() {
#if BSA_SM90_ENABLED
    return clock64();
#else
    return 0;
#endif
  }
  __device__ PhaseClock() : last(now()) {
    for (int i = 0; i < 8; ++i) acc[i] = 0;
  }
  __device__ void mark(int i) {
    const long long t = now();
    acc[i] += t - last;
    last = t;
  }
  __device__ void count() { ++acc[6]; }
  __device__ void flush(bool leader) {
#if BSA_SM90_ENABLED
    if (leader)
      for (int i = 0; i < 8; ++i) atomicAdd(&fwd_phase_cycles[i], acc[i]);
#endif
  }
};
#else
struct PhaseClock {
  __device__ void mark(int) {}
  __device__ void count() {}
  __device__ void flush(bool) {}
};
#endif

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
__global__ void __launch_bounds__(ForwardTraits<kDType, kHeadDim, kCapQ, kCapK>::kThreads, 1)
    forward_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                   const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_out,
                   const ForwardParams p, const int bh_base, const int qkv_head_base) {
#if !BSA_SM90_ENABLED
  __trap();  // built for other targets only so that one build covers every arch; never launched there
#else
  using Tr = ForwardTraits<kDType, kHeadDim, kCapQ, kCapK>;
  constexpr int kStagesK = Tr::kStagesK, kStagesV = Tr::kStagesV;
  constexpr int kRings = Tr::kRings;
  constexpr int kQRowsPerRing = kCapQ;

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Tr::kOffBars);
  int* k_packed = reinterpret_cast<int*>(smem + Tr::kOffKRows);
  RowCoord* q_rows = reinterpret_cast<RowCoord*>(smem + Tr::kOffQRows);

  const int tid = threadIdx.x;
  const int bh = bh_base + blockIdx.y;             // index into counts / indices / lse / out
  const int qkv_head = qkv_head_base + blockIdx.y;  // coordinate in the q/k/v tensor maps
  const int nq = p.geom_q.num_blocks(), nk = p.geom_k.num_blocks();

  if (tid == 0) {
    for (int r = 0; r < kRings; ++r) {
      const Ring<kStagesK, kStagesV> ring{bars + r * Tr::kBarsPerRing};
      for (int s = 0; s < kStagesK; ++s) {
        mbar_init(ring.full_k(s), 1);
        mbar_init(ring.empty_k(s), 4 * Tr::kConsumersPerRing);
      }
      for (int s = 0; s < kStagesV; ++s) {
        mbar_init(ring.full_v(s), 1);
        mbar_init(ring.empty_v(s), 4 * Tr::kConsumersPerRing);
      }
      mbar_init(ring.q_full(), 1);
    }
    mbar_init_fence();
  }
  for (int r = tid; r < kCapK; r += Tr::kThreads) k_packed[r] = row_coord(p.geom_k, r).packed;
  for (int r = tid; r < kCapQ; r += Tr::kThreads) q_rows[r] = row_coord(p.geom_q, r);
  // Ping-pong pays where both consumers share one query block (measured on H100: +7% at
  // W720s-c128); with two independent query blocks their natural interleaving was 2% faster.
  constexpr bool kPingPong = kRings == 1;
  __syncthreads();

  const int warpgroup = tid / 128;
  if (warpgroup == 0) {
    // ------------------------------------------------------------ producer
    setmaxnreg_dec<Tr::kProducerRegs>();
    const int warp = tid / 32, lane = tid % 32;
    if (warp >= kRings || lane != 0) return;
    const int r = warp;
    const int qb = query_block_of(p, bh, nq, blockIdx.x * kRings + r);
    if (qb >= nq) return;
    Ring<kStagesK, kStagesV> ring{bars + r * Tr::kBarsPerRing};
    unsigned char* sQ = smem + Tr::kOffQ + r * Tr::kQBytes;
    unsigned char* sK = smem + Tr::kOffK + r * kStagesK * Tr::kTileBytes;
    unsigned char* sV = smem + Tr::kOffV + r * kStagesV * Tr::kTileBytes;
    prefetch_tensor_map(&tm_q);
    prefetch_tensor_map(&tm_k);
    prefetch_tensor_map(&tm_v);

    const BoxOrigin qo = box_origin(p.geom_q, qb);
    mbar_arrive_expect_tx(ring.q_full(), Tr::kQBytes);
#pragma unroll
    for (int half = 0; half < Tr::kHalves; ++half)
      tma_load_5d(sQ + half * kCapQ * 128, &tm_q, ring.q_full(), half * 64, qo.x, qo.y, qo.z, qkv_head);

    const int64_t row_id = static_cast<int64_t>(bh) * nq + qb;
    const int32_t* ids = p.indices + row_id * p.kmax;
    int count = clamped_count(p.counts, row_id, p.kmax);
    int n = 0;  // valid blocks issued so far
    int id = count > 0 ? ids[0] : -1;
    for (int i = 0; i < count; ++i) {
      const int next = i + 1 < count ? ids[i + 1] : -1;  // fetched ahead: its latency hides behind a wait
      if (in_range(id, nk)) {
        const int sk = n % kStagesK, sv = n % kStagesV;
        const BoxOrigin ko = box_origin(p.geom_k, id);
        mbar_wait(ring.empty_k(sk), ((n / kStagesK) & 1) ^ 1);
        mbar_arrive_expect_tx(ring.full_k(sk), Tr::kTileBytes);
#pragma unroll
        for (int half = 0; half < Tr::kHalves; ++half)
          tma_load_5d(sK + sk * Tr::kTileBytes + half * kCapK * 128, &tm_k, ring.full_k(sk), half * 64, ko.x, ko.y, ko.z,
                      qkv_head);
        mbar_wait(ring.empty_v(sv), ((n / kStagesV) & 1) ^ 1);
        mbar_arrive_expect_tx(ring.full_v(sv), Tr::kTileBytes);
#pragma unroll
        for (int half = 0; half < Tr::kHalves; ++half)
          tma_load_5d(sV + sv * Tr::kTileBytes + half * kCapK * 128, &tm_v, ring.full_v(sv), half * 64, ko.x, ko.y, ko.z,
                      qkv_head);
        ++n;
      }
      id = next;
    }
    return;
  }

  // -------------------------------------------------------------- consumers
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int c = warpgroup - 1;
  const int r = kRings > 1 ? c : 0;
  const int row0 = kRings > 1 ? 0 : c * 64;  // this warpgroup's first row inside the query block
  const int qb = query_block_of(p, bh, nq, blockIdx.x * kRings + r);
  if (kPingPong && c == 1) named_barrier_arrive(3, 256);  // warpgroup 0 takes the first turn
  if (qb >= nq) return;
  Ring<kStagesK, kStagesV> ring{bars + r * Tr::kBarsPerRing};
  unsigned char* sQ = smem + Tr::kOffQ + r * Tr::kQBytes;
  const uint32_t q_addr = smem_u32(sQ) + row0 * 128;
  const uint32_t k_addr0 = smem_u32(smem + Tr::kOffK + r * kStagesK * Tr::kTileBytes);
  const uint32_t v_addr0 = smem_u32(smem + Tr::kOffV + r * kStagesV * Tr::kTileBytes);

  const int t = tid % 128, warp = t / 32, lane = t % 32;
  const int g = lane / 4, quad = lane % 4;
  const float scale_log2 = p.scale_log2;
  PhaseClock phases;  // 0 stage waits, 1 issue, 2 S wait, 3 softmax, 4 P V wait, 5 rescale + pack, 7 rest

  // The producer loads, in list order, exactly the ids inside [0, Nk): stage n holds the n-th of
  // them. Each warp counts them while the first tiles are in flight, so the steady loop needs no
  // ids at all, unless partial edge blocks must be masked (then it walks the list as well).
  const int64_t list_row = static_cast<int64_t>(bh) * nq + qb;
  const int32_t* list = p.indices + list_row * p.kmax;
  const int list_len = clamped_count(p.counts, list_row, p.kmax);
  int nvalid = 0;
  for (int i = lane; i < list_len; i += 32) nvalid += in_range(list[i], nk);
  nvalid = __reduce_add_sync(0xffffffff, nvalid);

  // Ping-pong: each warpgroup issues its wgmmas only in its turn, so one warpgroup's softmax
  // runs while the other's matrix products hold the tensor cores. Turns alternate through
  // named barriers 3 and 4. Both warpgroups read one list, so each knows the other's number of
  // turns (one per block's scores plus one for the last P V) and never waits for a turn that
  // will not come.
  const int other_turns = kPingPong && nvalid > 0 ? nvalid + 1 : 0;
  int turn = 0;
  auto turn_begin = [&]() {
    ++turn;
    if (kPingPong && (c == 0 ? turn - 1 <= other_turns : turn <= other_turns)) named_barrier_sync(3 + c, 256);
  };
  auto turn_end = [&]() {
    if (kPingPong) named_barrier_arrive(3 + (c ^ 1), 256);
  };

  float o[kHeadDim / 2];
#pragma unroll
  for (int i = 0; i < kHeadDim / 2; ++i) o[i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float corr[2];
  float s_acc[kCapK / 2];
  uint32_t pf[kCapK / 16][4];

  // Only shapes with partial edge blocks locate each key block (three divisions) to mask it.
  const bool k_edges = !p.geom_k.tiles_exactly();
  int cursor = 0;
  int ahead = k_edges && list_len > 0 ? list[0] : -1;  // the raw id at `cursor`, loaded a block early
  auto next_valid = [&]() {
    int x = ahead;
    ++cursor;
    while (!in_range(x, nk) && cursor < list_len) x = list[cursor++];
    ahead = cursor < list_len ? list[cursor] : -1;
    return x;
  };
  auto mask_edges = [&]() {
    if (k_edges) {
      const BlockOrigin ko = block_origin(p.geom_k, next_valid());
      if (!ko.full) mask_partial_block<kCapK>(s_acc, k_packed, ko, quad);
    }
  };

  mbar_wait(ring.q_full(), 0);  // even without keys: the epilogue reuses the Q rows
  if (nvalid > 0) {
    mbar_wait(ring.full_k(0), 0);
    // Block 0: scores, softmax, P.
    turn_begin();
    issue_scores<kDType, kHeadDim, kCapK, kQRowsPerRing>(s_acc, q_addr, k_addr0);
    turn_end();
    wgmma_wait<0>();
    fence_registers(s_acc);
    release(ring.empty_k(0), lane);
    mask_edges();
    online_softmax<kCapK>(s_acc, row_max, row_sum, corr, scale_log2);
    pack_p<kDType, kCapK>(pf, s_acc);

    // Steady state. Stage and phase of V of block n (s0, ph0) and of K of block n + 1 (s1, ph1)
    // advance by increments, not by n % kStages.
    int s0 = 0, s1 = 1 % kStagesK;
    uint32_t ph0 = 0, ph1 = kStagesK == 1 ? 1 : 0;
    auto next_stages = [&]() {
      if (++s0 == kStagesV) {
        s0 = 0;
        ph0 ^= 1;
      }
      if (++s1 == kStagesK) {
        s1 = 0;
        ph1 ^= 1;
      }
    };
    phases.mark(7);
    for (int n = 0; n + 1 < nvalid; ++n) {
      // Q's descriptors are rebuilt every step (a few integer ops) rather than kept: hoisted out
      // of the loop they took 16 registers, which three consumers at 160 cannot spare (spills).
      uint32_t q_step = q_addr;
      asm volatile("" : "+r"(q_step));
      mbar_wait(ring.full_k(s1), ph1);
      mbar_wait(ring.full_v(s0), ph0);
      phases.mark(0);
#ifdef BSA_FWD_LOAD_ONLY
      // Debug-only (tools/device/fwd_phases.cu): stages released unread, so the kernel time is
      // that of the loads alone through the same rings: the ceiling this design's K/V gathers set.
      release(ring.empty_k(s1), lane);
      release(ring.empty_v(s0), lane);
      next_stages();
      continue;
#endif
      turn_begin();
      issue_scores<kDType, kHeadDim, kCapK, kQRowsPerRing>(s_acc, q_step, k_addr0 + s1 * Tr::kTileBytes);
      issue_pv<kDType, kHeadDim, kCapK>(o, pf, v_addr0 + s0 * Tr::kTileBytes);
      turn_end();
      phases.mark(1);
      // Softmax of block n+1 overlaps P_n V_n on the tensor cores; O is not touched until it lands.
      wgmma_wait<1>();
      fence_registers(s_acc);
      phases.mark(2);
      release(ring.empty_k(s1), lane);
      mask_edges();
      online_softmax<kCapK>(s_acc, row_max, row_sum, corr, scale_log2);
      phases.mark(3);
      wgmma_wait<0>();
      fence_registers(o);
      fence_registers(pf);
      phases.mark(4);
      release(ring.empty_v(s0), lane);
      // The running max settles after a few blocks: skip the rescale when no row of the warp moved.
      if (__any_sync(0xffffffff, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int j = 0; j < kHeadDim / 8; ++j) {
          o[4 * j + 0] *= corr[0];
          o[4 * j + 1] *= corr[0];
          o[4 * j + 2] *= corr[1];
          o[4 * j + 3] *= corr[1];
        }
      }
      pack_p<kDType, kCapK>(pf, s_acc);
      phases.mark(5);
      phases.count();
      next_stages();
    }
    // Last block: P V alone.
    mbar_wait(ring.full_v(s0), ph0);
    turn_begin();
    issue_pv<kDType, kHeadDim, kCapK>(o, pf, v_addr0 + s0 * Tr::kTileBytes);
    turn_end();
    wgmma_wait<0>();
    fence_registers(o);
    release(ring.empty_v(s0), lane);
  }

  // -------------------------------------------------------------- epilogue
  // Normalised O goes into this warpgroup's own (no longer read) Q rows in the same swizzled
  // layout the TMA load produced, then one TMA store per 64-column half writes the chunk.
  float lse_row[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const RowEnd end = finish_row(row_sum[hr], row_max[hr], scale_log2);
    const float inv = end.inv;
    lse_row[hr] = end.lse;
    const int row = row0 + warp * 16 + g + 8 * hr;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      const uint32_t packed = ElementOf<kDType>::pack(o[4 * j + 2 * hr] * inv, o[4 * j + 2 * hr + 1] * inv);
      unsigned char* dst = sQ + (j / 8) * kCapQ * 128 + row * 128 + (((j % 8) ^ (row % 8)) << 4) + 4 * quad;
      *reinterpret_cast<uint32_t*>(dst) = packed;
    }
  }
  fence_proxy_async_smem();
  named_barrier_sync(1 + r, 128 * Tr::kConsumersPerRing);
  if (t == 0 && row0 == 0) {
    const BoxOrigin qo = box_origin(p.geom_q, qb);
#pragma unroll
    for (int half = 0; half < Tr::kHalves; ++half)
      tma_store_5d(&tm_out, sQ + half * kCapQ * 128, half * 64, qo.x, qo.y, qo.z, bh);
    tma_store_commit_and_drain();
  }
  if (quad == 0) {
    const BlockOrigin qo = block_origin(p.geom_q, qb);
    float* lse_base = p.lse + static_cast<int64_t>(bh) * p.seq_q;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const RowCoord rc = q_rows[row0 + warp * 16 + g + 8 * hr];
      if (qo.full || row_inside(qo, rc.packed)) lse_base[qo.token + rc.offset] = lse_row[hr];
    }
  }
  phases.mark(7);
  phases.flush(t == 0);
#endif
}

struct QkvMaps {
  CUtensorMap q, k, v;
};

}  // namespace sm90

template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_forward_sm90(const ForwardParams& p, cudaStream_t stream, bool* launched) {
  using Tr = sm90::ForwardTraits<kDType, kHeadDim, kCapQ, kCapK>;
  *launched = false;
  auto kernel = sm90::forward_kernel<kDType, kHeadDim, kCapQ, kCapK>;
  // Only sm_90a machine code runs this kernel (a build without 90a, or another GPU, falls back).
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.binaryVersion != 90) {
    cudaGetLastError();
    return cudaSuccess;
  }
  const int64_t B = p.batch, H = p.heads;
  // Batch and head merge into the maps' last dimension when the batch stride is H head strides.
  auto merges = [&](int64_t bs, int64_t hs) { return B == 1 || bs == H * hs; };
  const bool merged = merges(p.q_batch_stride, p.q_head_stride) && merges(p.k_batch_stride, p.k_head_stride) &&
                      merges(p.v_batch_stride, p.v_head_stride);
  const int64_t launches = merged ? 1 : B;
  const int64_t map_heads = merged ? B * H : H;
  std::vector<sm90::QkvMaps> maps(static_cast<size_t>(launches));
  using Element = typename ElementOf<kDType>::type;
  for (int64_t b = 0; b < launches; ++b) {
    const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride;
    const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride;
    const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride;
    if (!sm90::encode_chunk_map(&maps[b].q, q, kDType, kHeadDim, p.geom_q, p.q_row_stride, p.q_head_stride, map_heads) ||
        !sm90::encode_chunk_map(&maps[b].k, k, kDType, kHeadDim, p.geom_k, p.k_row_stride, p.k_head_stride, map_heads) ||
        !sm90::encode_chunk_map(&maps[b].v, v, kDType, kHeadDim, p.geom_k, p.v_row_stride, p.v_head_stride, map_heads))
      return cudaSuccess;
  }
  CUtensorMap out_map;
  if (p.out_batch_stride != H * p.out_head_stride && B > 1) return cudaSuccess;
  if (!sm90::encode_chunk_map(&out_map, p.out, kDType, kHeadDim, p.geom_q, p.out_row_stride, p.out_head_stride, B * H))
    return cudaSuccess;

  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (err != cudaSuccess) return err;
  const int nq = p.geom_q.num_blocks();
  // blockIdx.x (query blocks) runs fastest: the CTAs in flight work on one head at a time.
  const dim3 grid((nq + Tr::kRings - 1) / Tr::kRings, static_cast<unsigned>(map_heads));
  *launched = true;
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  for (int64_t b = 0; b < launches; ++b) {
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(maps[b].q, maps[b].k, maps[b].v, out_map, p,
                                                           static_cast<int>(b * H), 0);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace bsa
