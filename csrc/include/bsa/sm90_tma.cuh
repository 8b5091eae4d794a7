// Hopper TMA over THW chunks, shared by the sm_90a forward and backward: a THW-ordered
// [heads, T*H*W, head_dim] slab is viewed as the 5-D tensor (D, W, H, T, heads) whose box is one
// 3D chunk's 64-column half, so a chunk lands in shared memory in chunk-row order (t, h, w) with
// the 128-byte swizzle, and rows of partial edge chunks (outside the tensor) arrive as zeros.
#pragma once

#include <cstdint>

#include <cuda.h>
#include <cuda_runtime.h>

#include "bsa/params.h"

namespace bsa {
namespace sm90 {

// Chunk grid coordinates (iw, ih, it) of block b: the TMA box origin is (iw*w, ih*h, it*t).
struct BoxOrigin {
  int x, y, z;
};
__device__ __forceinline__ BoxOrigin box_origin(const Geometry& g, int b) {
  return {(b % g.Nw) * g.w, ((b / g.Nw) % g.Nh) * g.h, (b / (g.Nh * g.Nw)) * g.t};
}

// ------------------------------------------------------------------ host side
using TensorMapEncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                          const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                                          CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                          CUtensorMapFloatOOBfill);

// The driver's encoder, found through the runtime so that nothing links against libcuda.
inline TensorMapEncodeTiled tensor_map_encoder() {
  static const TensorMapEncodeTiled fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<TensorMapEncodeTiled>(nullptr);
    }
    return reinterpret_cast<TensorMapEncodeTiled>(ptr);
  }();
  return fn;
}

// A THW-ordered [heads, T*H*W, head_dim] slab as the 5-D tensor (D, W, H, T, heads) whose box is
// one chunk's 64-column half. False when TMA cannot express it (alignment, stride range).
inline bool encode_chunk_map(CUtensorMap* map, const void* base, DType dtype, int head_dim, const Geometry& g,
                             int64_t row_stride, int64_t head_stride, int64_t heads) {
  const TensorMapEncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const int64_t row_bytes = row_stride * 2;
  int64_t head_bytes = head_stride * 2;
  if (heads == 1 || head_bytes == 0) {
    // Only coordinate 0 is ever used: any legal stride will do.
    head_bytes = ((static_cast<int64_t>(g.T) * g.H * g.W * row_bytes + 15) / 16) * 16;
  }
  const cuuint64_t dims[5] = {cuuint64_t(head_dim), cuuint64_t(g.W), cuuint64_t(g.H), cuuint64_t(g.T),
                              cuuint64_t(heads)};
  const cuuint64_t strides[4] = {cuuint64_t(row_bytes), cuuint64_t(row_bytes * g.W),
                                 cuuint64_t(row_bytes * g.W * g.H), cuuint64_t(head_bytes)};
  const cuuint32_t box[5] = {64, cuuint32_t(g.w), cuuint32_t(g.h), cuuint32_t(g.t), 1};
  const cuuint32_t elem_strides[5] = {1, 1, 1, 1, 1};
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int i = 0; i < 4; ++i)
    if (static_cast<int64_t>(strides[i]) <= 0 || strides[i] % 16 != 0 || strides[i] >= (1ull << 40)) return false;
  for (int i = 1; i < 4; ++i)
    if (box[i] > 256) return false;
  if (heads >= (int64_t(1) << 31)) return false;
  const CUresult res = encode(map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                              5, const_cast<void*>(base), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS;
}

}  // namespace sm90
}  // namespace bsa
