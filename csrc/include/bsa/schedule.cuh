// Launch order of the query blocks for the Hopper forward (compiled once, in
// instantiations/schedule.cu): for every batch*head row, the query block ids sorted by
// descending count (clamped to [0, kmax]), ties in ascending id order.
//
// Why: each CTA of the capacity-64 forward runs two query blocks, one per consumer warpgroup,
// and ends when the longer list ends. Taken in id order, neighbours' counts differ a lot in
// cdf mode (at W720s-cdf the pairs' longer lists sum to 1.28x the mean), so one warpgroup
// idles; taken in this order, the two lists of a CTA are about as long, and the longest
// start first. With equal counts (top-k) the order is the identity: nothing changes there.
//
// One CTA per row: all warps bucket the counts (a histogram, and each query block's bucket
// kept in shared memory), warp 0 scans the histogram and scatters stably, 32 query blocks at a
// time (lanes with the same bucket rank themselves by lane). Buckets are exact up to
// kmax = kBuckets - 1 and approximate above, which is all the pairing needs.
#pragma once

#include <cstdint>

#include "bsa/api.h"
#include "bsa/params.h"

namespace bsa {
namespace sched {

constexpr int kBuckets = 1024;
constexpr int kThreads = 256;

// Shared memory of one row: the histogram / offsets, then one 16-bit bucket per query block.
inline int smem_bytes(int nq) { return kBuckets * 4 + ((nq * 2 + 15) / 16) * 16; }

__global__ void __launch_bounds__(kThreads) schedule_kernel(const ScheduleParams p) {
  extern __shared__ int smem[];
  int* offset = smem;
  uint16_t* bucket = reinterpret_cast<uint16_t*>(smem + kBuckets);
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % 32;
  for (int i = tid; i < kBuckets; i += kThreads) offset[i] = 0;
  __syncthreads();
  for (int qb = tid; qb < p.nq; qb += kThreads) {
    const int c = clamped_count(p.counts, row * p.nq + qb, p.kmax);
    const int b = static_cast<int>(static_cast<int64_t>(p.kmax - c) * kBuckets / (p.kmax + 1));  // 0: longest
    bucket[qb] = static_cast<uint16_t>(b);
    atomicAdd(&offset[b], 1);
  }
  __syncthreads();
  if (tid >= 32) return;
  // Exclusive scan: lane l owns buckets [32 l, 32 l + 32).
  constexpr int kPerLane = kBuckets / 32;
  int sum = 0;
  for (int i = 0; i < kPerLane; ++i) sum += offset[lane * kPerLane + i];
  int before = sum;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffff, before, d);
    if (lane >= d) before += y;
  }
  before -= sum;
  __syncwarp();
  for (int i = 0; i < kPerLane; ++i) {
    const int n = offset[lane * kPerLane + i];
    offset[lane * kPerLane + i] = before;
    before += n;
  }
  __syncwarp();
  // Stable scatter in id order.
  int32_t* order = p.order + row * p.nq;
  for (int base = 0; base < p.nq; base += 32) {
    const int qb = base + lane;
    const bool live = qb < p.nq;
    const int b = live ? bucket[qb] : kBuckets + lane;  // idle lanes match no one
    const unsigned peers = __match_any_sync(0xffffffff, b);
    if (live) order[offset[b] + __popc(peers & ((1u << lane) - 1))] = qb;
    __syncwarp();
    if (live && lane == __ffs(peers) - 1) offset[b] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace sched

cudaError_t run_schedule(const ScheduleParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.nq == 0) return cudaSuccess;
  const int smem = sched::smem_bytes(p.nq);
  if (smem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(sched::schedule_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  sched::schedule_kernel<<<p.rows, sched::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bsa
