// Inverse block index on the device (compiled once, in instantiations/invert.cu): for every
// (batch*head row, key block), the query blocks whose first counts[q] entries name it, in
// ascending order. Four kernels, no host sync, fixed output capacity (Nq * kmax entries per row), so backward can be captured in a CUDA graph:
// 1. count: degree[key] += 1 for every live entry (ids outside [0, Nk) and entries past
//    counts are skipped);
// 2. scan: qoffsets = exclusive prefix sum of degree; degree becomes each segment's cursor;
// 3. fill: every live entry claims a slot of its key block's segment (atomic cursor);
// 4. sort: each segment is put in ascending order by a counting sort over the query ids in
//    shared memory, which makes the result independent of the order the slots were claimed
//    (and so the dk/dv sums deterministic).
#pragma once

#include <cstdint>

#include "bsa/api.h"
#include "bsa/params.h"

namespace bsa {
namespace inv {

constexpr int kThreads = 256;
constexpr int kScanThreads = 1024;

// The key block named by entry i of row `row`, or -1 when the entry does not count.
__device__ __forceinline__ int live_key(const InvertParams& p, int row, int i) {
  const int q = i / p.kmax, j = i % p.kmax;
  int count = clamped_count(p.counts, static_cast<int64_t>(row) * p.nq + q, p.kmax);
  if (j >= count) return -1;
  const int id = p.indices[static_cast<int64_t>(row) * p.nq * p.kmax + i];
  return in_range(id, p.nk) ? id : -1;
}

__global__ void __launch_bounds__(kThreads) count_kernel(const InvertParams p) {
  const int row = blockIdx.y;
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= p.nq * p.kmax) return;
  const int id = live_key(p, row, i);
  if (id >= 0) atomicAdd(p.degree + static_cast<int64_t>(row) * p.nk + id, 1);
}

// Exclusive scan of kThreads-per-block partial sums held one per thread; returns this
// thread's prefix and writes the block total to *total.
template <int kBlock>
__device__ __forceinline__ int block_exclusive_scan(int x, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = x;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffff, incl, d);
    if (lane >= d) incl += y;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kBlock / 32 ? warp_sums[lane] : 0;
    int wi = w;
#pragma unroll
    for (int d = 1; d < 32; d *= 2) {
      const int y = __shfl_up_sync(0xffffffff, wi, d);
      if (lane >= d) wi += y;
    }
    if (lane < kBlock / 32) warp_sums[lane] = wi - w;
    if (lane == 31) warp_sums[32] = wi;
  }
  __syncthreads();
  const int result = warp_sums[warp] + incl - x;
  *total = warp_sums[32];
  __syncthreads();  // warp_sums may be reused by the caller
  return result;
}

__global__ void __launch_bounds__(kScanThreads) scan_kernel(const InvertParams p) {
  __shared__ int warp_sums[33];
  const int row = blockIdx.x;
  int32_t* degree = p.degree + static_cast<int64_t>(row) * p.nk;
  int32_t* offsets = p.qoffsets + static_cast<int64_t>(row) * (p.nk + 1);
  const int per = (p.nk + kScanThreads - 1) / kScanThreads;
  const int lo = min(p.nk, threadIdx.x * per), hi = min(p.nk, lo + per);
  int sum = 0;
  for (int j = lo; j < hi; ++j) sum += degree[j];
  int total = 0;
  int run = block_exclusive_scan<kScanThreads>(sum, warp_sums, &total);
  for (int j = lo; j < hi; ++j) {
    const int d = degree[j];
    offsets[j] = run;
    degree[j] = run;  // the fill cursor of segment j
    run += d;
  }
  if (threadIdx.x == 0) offsets[p.nk] = total;
}

__global__ void __launch_bounds__(kThreads) fill_kernel(const InvertParams p) {
  const int row = blockIdx.y;
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= p.nq * p.kmax) return;
  const int id = live_key(p, row, i);
  if (id < 0) return;
  const int slot = atomicAdd(p.degree + static_cast<int64_t>(row) * p.nk + id, 1);
  p.qlist[static_cast<int64_t>(row) * p.nq * p.kmax + slot] = i / p.kmax;
}

// One CTA per (key block, row): counts of each query id in shared memory (dynamic, nq ints),
// then the ids written back in ascending order, each as often as it occurred.
__global__ void __launch_bounds__(kThreads) sort_kernel(const InvertParams p) {
  extern __shared__ int hist[];
  __shared__ int warp_sums[33];
  const int kb = blockIdx.x, row = blockIdx.y;
  const int32_t* offsets = p.qoffsets + static_cast<int64_t>(row) * (p.nk + 1);
  const int begin = offsets[kb], end = offsets[kb + 1];
  if (end - begin <= 1) return;  // uniform over the CTA
  int32_t* seg = p.qlist + static_cast<int64_t>(row) * p.nq * p.kmax + begin;
  for (int q = threadIdx.x; q < p.nq; q += kThreads) hist[q] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < end - begin; i += kThreads) atomicAdd(hist + seg[i], 1);
  __syncthreads();
  const int per = (p.nq + kThreads - 1) / kThreads;
  const int lo = min(p.nq, int(threadIdx.x) * per), hi = min(p.nq, lo + per);
  int sum = 0;
  for (int q = lo; q < hi; ++q) sum += hist[q];
  int total = 0;
  int at = block_exclusive_scan<kThreads>(sum, warp_sums, &total);
  for (int q = lo; q < hi; ++q)
    for (int r = hist[q]; r > 0; --r) seg[at++] = q;
}

}  // namespace inv

cudaError_t run_invert(const InvertParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.nk == 0) return cudaSuccess;
  if (p.nq > kInvertMaxQueryBlocks) return cudaErrorInvalidValue;
  const int sort_smem = p.nq * static_cast<int>(sizeof(int));
  cudaError_t err = cudaFuncSetAttribute(inv::sort_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, sort_smem);
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(p.degree, 0, sizeof(int32_t) * static_cast<size_t>(p.rows) * p.nk, stream);
  if (err != cudaSuccess) return err;
  const int entries = p.nq * p.kmax;
  const dim3 entry_grid((entries + inv::kThreads - 1) / inv::kThreads, p.rows);
  if (entries > 0) inv::count_kernel<<<entry_grid, inv::kThreads, 0, stream>>>(p);
  inv::scan_kernel<<<p.rows, inv::kScanThreads, 0, stream>>>(p);
  if (entries > 0) {
    inv::fill_kernel<<<entry_grid, inv::kThreads, 0, stream>>>(p);
    inv::sort_kernel<<<dim3(p.nk, p.rows), inv::kThreads, sort_smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace bsa
