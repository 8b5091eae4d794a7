// Shared-memory tiles for the sm_80 kernels (forward and backward) and the warp-level
// matrix products the backward is built from.
//
// A tile is kRows rows of kHeadDim elements, one token per row, gathered from a THW-ordered
// tensor with the chunk arithmetic of params.h. The 16-byte chunks of each row are
// XOR-swizzled by row % 8, so that ldmatrix (8 rows, same logical chunk) and cp.async hit
// distinct banks. Fragment layouts follow mma.sync.m16n8k16: an accumulator acc[j][0..3]
// holds rows g and g+8 (g = lane / 4), columns 8j + 2(lane % 4) + {0, 1}.
#pragma once

#include <cstdint>

#include "bsa/params.h"
#include "bsa/ptx.cuh"

namespace bsa {

template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int col) {
  return row * kHeadDim + ((((col >> 3) ^ (row & 7))) << 3);
}

// Copies kRows rows of block `o` into smem (zero rows where padding or `live` is false).
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(Element* smem, const Element* base, int64_t row_stride,
                                          const RowCoord* rows, const BlockOrigin& o, bool live, int tid) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kIters = kRows * kChunks / kThreads;
  static_assert(kRows * kChunks % kThreads == 0, "tile must split evenly over the threads");
  const Element* block_base = base + static_cast<int64_t>(o.token) * row_stride;
  if (live && o.full) {
    // Interior block (the common case): no per-row tests; partial unroll bounds live addresses.
#pragma unroll 4
    for (int it = 0; it < kIters; ++it) {
      const int i = tid + it * kThreads;
      const int r = i / kChunks, c = i % kChunks;
      const Element* src = block_base + static_cast<int64_t>(rows[r].offset) * row_stride + c * 8;
      cp_async_16(smem + swizzle<kHeadDim>(r, c * 8), src, 16);
    }
    return;
  }
#pragma unroll 1
  for (int it = 0; it < kIters; ++it) {
    const int i = tid + it * kThreads;
    const int r = i / kChunks, c = i % kChunks;
    const RowCoord rc = rows[r];
    const bool ok = live && row_inside(o, rc.packed);
    // Padding rows still need a legal address: the tensor's first element is never out of bounds.
    const Element* src = ok ? block_base + static_cast<int64_t>(rc.offset) * row_stride + c * 8 : base;
    cp_async_16(smem + swizzle<kHeadDim>(r, c * 8), src, ok ? 16 : 0);
  }
}

// Copies an interior block (every row valid) whose first token is at `block_base`, with the
// rows' byte offsets from it precomputed (`row_off`, 32-bit, laid out by row_table_slot). A
// thread copies one 16-byte column (c = tid % chunks) of rows r0, r0 + step, ...: its source
// column is added once, and its row offsets sit side by side in the table, so that all of them
// arrive in a few 16-byte shared loads issued back to back, after which each copy is one
// 64-bit add. (ncu, sm80 forward: with 64-bit offsets read four at a time, each batch's adds
// waited on its shared load and the copy bursts took ~30% of the warps' time; offsets in
// elements cost a scaling to bytes per copy on top. docs/PERF.md, session 12.)
template <int kHeadDim, int kRows, int kThreads>
__host__ __device__ constexpr int row_table_slot(int r) {
  constexpr int kRowStep = kThreads / (kHeadDim / 8);
  return (r % kRowStep) * (kRows / kRowStep) + r / kRowStep;
}

template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_full_tile(Element* smem, const Element* block_base, const uint32_t* row_off,
                                               int tid) {
  constexpr int kChunks = kHeadDim / 8;
  constexpr int kRowStep = kThreads / kChunks;
  constexpr int kPerThread = kRows / kRowStep;
  static_assert(kThreads % kChunks == 0 && kPerThread % 4 == 0, "tile must split evenly over the threads");
  // Derived afresh at every call: hoisted out of the caller's loop, the column's addresses
  // would stay live across it (the sm_80 build of the 64-key forward then spilled).
  int t = tid;
  asm volatile("" : "+r"(t));
  const int c = t % kChunks, r0 = t / kChunks;
  const char* src = reinterpret_cast<const char*>(block_base + c * 8);
  const uint4* offs = reinterpret_cast<const uint4*>(row_off + r0 * kPerThread);  // 16-byte aligned
  uint32_t off[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread / 4; ++i) {
    const uint4 v = offs[i];
    off[4 * i] = v.x;
    off[4 * i + 1] = v.y;
    off[4 * i + 2] = v.z;
    off[4 * i + 3] = v.w;
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j)
    cp_async_16(smem + swizzle<kHeadDim>(r0 + j * kRowStep, c * 8), src + off[j], 16);
}

// Fills the row-offset tables (bytes, by row_table_slot) of two tensors gathered with one
// block geometry (K and V, or Q and dO), from that geometry's row table `rows` as
// init_row_tables filled it: each thread reads back the rows it wrote itself (both loops give
// row r to thread r % kThreads), so no barrier is needed in between. Returns false where one
// of this thread's offsets does not fit in 32 bits (a block spanning 4 GiB of rows): the
// kernels then AND it over the CTA and copy every block row by row.
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ bool init_row_offsets(uint32_t* a_off, uint32_t* b_off, const RowCoord* rows,
                                                 int64_t a_stride, int64_t b_stride, int tid) {
  bool fits = true;
  for (int r = tid; r < kRows; r += kThreads) {
    const int64_t offset = static_cast<int64_t>(rows[r].offset) * static_cast<int64_t>(sizeof(Element));
    const int64_t a = offset * a_stride, b = offset * b_stride;
    fits = fits && a >= 0 && b >= 0 && a <= int64_t{0xffffffff} && b <= int64_t{0xffffffff};
    const int slot = row_table_slot<kHeadDim, kRows, kThreads>(r);
    a_off[slot] = static_cast<uint32_t>(a);
    b_off[slot] = static_cast<uint32_t>(b);
  }
  return fits;
}

// A tile of block `o`: interior blocks through the offset table, edge blocks (and skipped ids)
// row by row with zero fill.
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_block_tile(Element* smem, const Element* base, int64_t row_stride,
                                             const uint32_t* row_off, bool table_ok, const RowCoord* rows,
                                             const BlockOrigin& o, bool live, int tid) {
  // The table path needs a whole number of four-row batches per thread (not so for 64-row
  // tiles at head dim 64 over 256 threads: two rows each).
  constexpr int kChunks = kHeadDim / 8;
  constexpr bool kTable = kThreads % kChunks == 0 && (kRows / (kThreads / kChunks)) % 4 == 0;
  if constexpr (kTable) {
    if (table_ok && live && o.full) {
      load_full_tile<Element, kHeadDim, kRows, kThreads>(smem, base + static_cast<int64_t>(o.token) * row_stride,
                                                         row_off, tid);
      return;
    }
  }
  load_tile<Element, kHeadDim, kRows, kThreads>(smem, base, row_stride, rows, o, live, tid);
}

// acc[j] (16 x 8kN) += A[a_row0 .. +16, 0 .. kHeadDim) * B[b_row0 .. +8kN, 0 .. kHeadDim)^T for one
// warp: both operands are tiles whose rows run along the reduction (Q K^T, dO V^T, K Q^T, V dO^T).
template <DType kDType, int kHeadDim, int kN>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[kN][4], const typename ElementOf<kDType>::type* sA, int a_row0,
                                             const typename ElementOf<kDType>::type* sB, int b_row0, int lane) {
  static_assert(kN % 2 == 0, "n-tiles come in pairs (one ldmatrix.x4 feeds two)");
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    uint32_t af[4];
    ldmatrix_x4(af, sA + swizzle<kHeadDim>(a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8));
#pragma unroll
    for (int np = 0; np < kN / 2; ++np) {
      uint32_t bf[4];
      const int row = b_row0 + np * 16 + (lane >> 4) * 8 + (lane & 7);
      ldmatrix_x4(bf, sB + swizzle<kHeadDim>(row, kk * 16 + ((lane >> 3) & 1) * 8));
      mma_16816<kDType>(acc[2 * np], af, bf[0], bf[1]);
      mma_16816<kDType>(acc[2 * np + 1], af, bf[2], bf[3]);
    }
  }
}

// acc (16 x kHeadDim) += A * B[b_row0 .. +8kN, 0 .. kHeadDim) for one warp, where A (16 x 8kN) is
// an fp32 accumulator of this warp rounded to the element type (P V, dS K, P^T dO, dS^T Q).
template <DType kDType, int kHeadDim, int kN>
__device__ __forceinline__ void warp_gemm_rn(float (&acc)[kHeadDim / 8][4], const float (&a)[kN][4],
                                             const typename ElementOf<kDType>::type* sB, int b_row0, int lane) {
  using E = ElementOf<kDType>;
#pragma unroll
  for (int kk = 0; kk < kN / 2; ++kk) {
    const uint32_t af[4] = {E::pack(a[2 * kk][0], a[2 * kk][1]), E::pack(a[2 * kk][2], a[2 * kk][3]),
                            E::pack(a[2 * kk + 1][0], a[2 * kk + 1][1]), E::pack(a[2 * kk + 1][2], a[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < kHeadDim / 16; ++dp) {
      uint32_t bf[4];
      const int row = b_row0 + kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
      ldmatrix_x4_trans(bf, sB + swizzle<kHeadDim>(row, dp * 16 + (lane >> 4) * 8));
      mma_16816<kDType>(acc[2 * dp], af, bf[0], bf[1]);
      mma_16816<kDType>(acc[2 * dp + 1], af, bf[2], bf[3]);
    }
  }
}

// Writes this warp's 16 accumulator rows (times `scale`, rounded) into rows row0.. of `tile`.
template <DType kDType, int kHeadDim>
__device__ __forceinline__ void stage_rows(typename ElementOf<kDType>::type* tile, int row0,
                                           const float (&acc)[kHeadDim / 8][4], float scale, int lane) {
  const int g = lane >> 2, c = lane & 3;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int row = row0 + g + 8 * hr;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
      *reinterpret_cast<uint32_t*>(tile + swizzle<kHeadDim>(row, j * 8) + 2 * c) =
          ElementOf<kDType>::pack(acc[j][2 * hr] * scale, acc[j][2 * hr + 1] * scale);
  }
}

// Stores rows row0 .. row0+kRows of `tile` to their THW rows of block `o` (padding rows skipped);
// one warp, 16-byte stores.
template <typename Element, int kHeadDim, int kRows>
__device__ __forceinline__ void store_rows(Element* base, int64_t row_stride, const Element* tile, int row0,
                                           const RowCoord* rows, const BlockOrigin& o, int lane) {
  constexpr int kChunks = kHeadDim / 8;
#pragma unroll
  for (int it = 0; it < kRows * kChunks / 32; ++it) {
    const int i = lane + it * 32;
    const int row = row0 + i / kChunks, ch = i % kChunks;
    const RowCoord rc = rows[row];
    if (o.full || row_inside(o, rc.packed))
      *reinterpret_cast<int4*>(base + static_cast<int64_t>(o.token + rc.offset) * row_stride + ch * 8) =
          *reinterpret_cast<const int4*>(tile + swizzle<kHeadDim>(row, ch * 8));
  }
}

}  // namespace bsa
