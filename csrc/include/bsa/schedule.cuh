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
// One warp per row: a histogram of count buckets, its exclusive scan, then a stable scatter
// 32 query blocks at a time (lanes with the same bucket rank themselves by lane). Buckets are
// exact up to kmax = kBuckets - 1 and approximate above, which is all the pairing needs.
#pragma once

#include <cstdint>

#include "bsa/api.h"
#include "bsa/params.h"

namespace bsa {
namespace sched {

constexpr int kBuckets = 1024;

// Bucket of a count: 0 for the longest lists.
__device__ __forceinline__ int bucket_of(const ScheduleParams& p, int64_t row, int qb) {
  const int c = clamped_count(p.counts, row * p.nq + qb, p.kmax);
  return static_cast<int>(static_cast<int64_t>(p.kmax - c) * kBuckets / (p.kmax + 1));
}

__global__ void __launch_bounds__(32) schedule_kernel(const ScheduleParams p) {
  __shared__ int offset[kBuckets];
  const int64_t row = blockIdx.x;
  const int lane = threadIdx.x;
  int32_t* order = p.order + row * p.nq;
  for (int i = lane; i < kBuckets; i += 32) offset[i] = 0;
  __syncwarp();
  for (int qb = lane; qb < p.nq; qb += 32) atomicAdd(&offset[bucket_of(p, row, qb)], 1);
  __syncwarp();
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
  for (int base = 0; base < p.nq; base += 32) {
    const int qb = base + lane;
    const bool live = qb < p.nq;
    const int b = live ? bucket_of(p, row, qb) : kBuckets + lane;  // idle lanes match no one
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
  sched::schedule_kernel<<<p.rows, 32, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bsa
