// Merges two partial attentions of the same queries over disjoint key sets (compiled per
// dtype in instantiations/merge_*.cu). With lse = log(e^lse1 + e^lse2):
//   out = out1 * e^(lse1 - lse) + out2 * e^(lse2 - lse),
// in fp32 and rounded once. A row that saw no key in either part (both lse -inf) keeps
// out = 0 and lse = -inf. The context-parallel forward uses it to combine the attention over
// a rank's own key blocks (computed while the fetch runs) with that over the fetched ones.
// One pass: reads both outputs once and writes one (torch's elementwise chain moved ~6x that).
#pragma once

#include <cmath>
#include <cstdint>

#include "bsa/api.h"
#include "bsa/params.h"
#include "bsa/ptx.cuh"

namespace bsa {
namespace merge {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread: one 16-byte load from each part

template <DType kDType>
__global__ void __launch_bounds__(kThreads) merge_kernel(const MergeParams p) {
  using Element = typename ElementOf<kDType>::type;
  const int per_row = p.head_dim / kVec;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.rows * per_row) return;
  const int64_t row = i / per_row;
  const int col = static_cast<int>(i % per_row) * kVec;
  const float l1 = p.lse1[row], l2 = p.lse2[row];
  const float m = fmaxf(l1, l2);
  float w1 = 0.f, w2 = 0.f, lse = -INFINITY;
  if (m != -INFINITY) {  // at least one part saw a key: its weight is > 0
    const float e1 = expf(l1 - m), e2 = expf(l2 - m);
    const float inv = 1.f / (e1 + e2);
    w1 = e1 * inv, w2 = e2 * inv;
    lse = m + logf(e1 + e2);
  }
  const int64_t at = row * p.head_dim + col;
  const int4 a = *reinterpret_cast<const int4*>(static_cast<const Element*>(p.out1) + at);
  const int4 b = *reinterpret_cast<const int4*>(static_cast<const Element*>(p.out2) + at);
  const uint32_t* x = reinterpret_cast<const uint32_t*>(&a);
  const uint32_t* y = reinterpret_cast<const uint32_t*>(&b);
  int4 r;
  uint32_t* z = reinterpret_cast<uint32_t*>(&r);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 u = ElementOf<kDType>::unpack(x[e]), v = ElementOf<kDType>::unpack(y[e]);
    z[e] = ElementOf<kDType>::pack(u.x * w1 + v.x * w2, u.y * w1 + v.y * w2);
  }
  *reinterpret_cast<int4*>(static_cast<Element*>(p.out) + at) = r;
  if (col == 0) p.lse[row] = lse;
}

}  // namespace merge

template <DType kDType>
cudaError_t run_merge(const MergeParams& p, cudaStream_t stream) {
  const int64_t threads = p.rows * (p.head_dim / merge::kVec);
  if (threads == 0) return cudaSuccess;
  const int64_t blocks = (threads + merge::kThreads - 1) / merge::kThreads;
  merge::merge_kernel<kDType><<<static_cast<unsigned>(blocks), merge::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bsa
