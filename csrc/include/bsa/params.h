// Plain parameter structs shared by the kernels and the binding: raw pointers and
// element strides only, so that no kernel header ever includes a torch header.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace bsa {

// The nine integers of ChunkGeometry.as_ints(): latent (T, H, W), chunk (t, h, w), grid.
struct Geometry {
  int T, H, W;
  int t, h, w;
  int Nt, Nh, Nw;

  __host__ __device__ int num_blocks() const { return Nt * Nh * Nw; }
  __host__ __device__ int capacity() const { return t * h * w; }
  // No partial edge blocks: every block's rows are all real tokens.
  __host__ __device__ bool tiles_exactly() const { return T % t == 0 && H % h == 0 && W % w == 0; }
};

// Per-row position of a block-local row, independent of the block (one table per CTA).
struct RowCoord {
  int offset;  // dt*H*W + dh*W + dw: add the block origin to get the token
  int packed;  // dt | dh << 10 | dw << 20, to test rows of partial edge blocks
};

__host__ __device__ inline RowCoord row_coord(const Geometry& g, int r) {
  const int hw = g.h * g.w;
  const int dt = r / hw, dh = (r / g.w) % g.h, dw = r % g.w;
  return {(dt * g.H + dh) * g.W + dw, dt | (dh << 10) | (dw << 20)};
}

// Fills a CTA's row tables of one query chunk and one key chunk (called by all `threads` threads).
__device__ inline void init_row_tables(RowCoord* q_rows, RowCoord* k_rows, const Geometry& gq, const Geometry& gk,
                                       int cap_q, int cap_k, int tid, int threads) {
  for (int r = tid; r < cap_q; r += threads) q_rows[r] = row_coord(gq, r);
  for (int r = tid; r < cap_k; r += threads) k_rows[r] = row_coord(gk, r);
}
// The same for kernels whose capacities and thread count are compile-time constants.
template <int kCapQ, int kCapK, int kThreads>
__device__ inline void init_row_tables(RowCoord* q_rows, RowCoord* k_rows, const Geometry& gq, const Geometry& gk,
                                       int tid) {
  init_row_tables(q_rows, k_rows, gq, gk, kCapQ, kCapK, tid, kThreads);
}

// Whether a block id from a user tensor names one of n blocks (one unsigned compare).
__host__ __device__ inline bool in_range(int id, int n) {
  return static_cast<unsigned>(id) < static_cast<unsigned>(n);
}

// A block list's count from a user tensor, clamped to [0, width]: entries past it are never read.
__host__ __device__ inline int clamped_count(const int32_t* counts, int64_t row, int width) {
  const int n = counts[row];
  return n < 0 ? 0 : (n > width ? width : n);
}

// First element of head (b, h) of a [B, H, S, D] view given by its element strides.
template <typename Element>
__host__ __device__ inline const Element* head_base(const void* x, int64_t batch_stride, int64_t head_stride, int b, int h) {
  return static_cast<const Element*>(x) + b * batch_stride + h * head_stride;
}

// Origin token and the number of valid coordinates left in each direction for block b.
struct BlockOrigin {
  int token;
  int rem_t, rem_h, rem_w;  // rows with dt < rem_t && dh < rem_h && dw < rem_w are real
  bool full;                // the whole block lies inside the latent
};

__host__ __device__ inline BlockOrigin block_origin(const Geometry& g, int b) {
  const int it = b / (g.Nh * g.Nw), ih = (b / g.Nw) % g.Nh, iw = b % g.Nw;
  BlockOrigin o;
  o.token = ((it * g.t) * g.H + ih * g.h) * g.W + iw * g.w;
  o.rem_t = g.T - it * g.t;
  o.rem_h = g.H - ih * g.h;
  o.rem_w = g.W - iw * g.w;
  o.full = o.rem_t >= g.t && o.rem_h >= g.h && o.rem_w >= g.w;
  return o;
}

// The number of real rows (tokens inside the latent) of the block at o.
__host__ __device__ inline int valid_rows(const Geometry& g, const BlockOrigin& o) {
  const int t = o.rem_t < g.t ? o.rem_t : g.t, h = o.rem_h < g.h ? o.rem_h : g.h, w = o.rem_w < g.w ? o.rem_w : g.w;
  return t * h * w;
}

__host__ __device__ inline bool row_inside(const BlockOrigin& o, int packed) {
  return (packed & 1023) < o.rem_t && ((packed >> 10) & 1023) < o.rem_h && (packed >> 20) < o.rem_w;
}

// Block-sparse forward: out/lse for every query block from its listed key blocks.
struct ForwardParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const int32_t* indices;  // [B, H, Nq, kmax] contiguous
  const int32_t* counts;   // [B, H, Nq] contiguous
  const int32_t* order;    // [B, H, Nq]: query blocks in launch order (run_schedule), or null: 0, 1, ...
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int batch, heads, seq_q, seq_k, kmax;
  Geometry geom_q, geom_k;
  float sm_scale;
  float scale_log2;  // sm_scale * log2(e): softmax runs on exp2
  // K/V tile buffers of the sm80 64-key forward (forward_wide_kernel): 2 (a block's V and the next
  // block's K land behind products) or 1 (smaller CTAs, for SMs with less shared memory); 0 lets
  // run_forward choose by the device's shared memory per SM (wide_forward_kv_buffers in api.h).
  int kv_buffers;
};

// Launch order of the query blocks (bsa/schedule.cuh): per row, ids by descending count.
struct ScheduleParams {
  const int32_t* counts;  // [rows, Nq]
  int32_t* order;         // [rows, Nq]
  int rows, nq, kmax;
};

// Merge of two partial attentions over disjoint key sets (bsa/merge.cuh). All contiguous:
// out1, out2, out [rows, head_dim] in the kernel dtype, lse1, lse2, lse [rows] fp32.
struct MergeParams {
  const void* out1;
  const void* out2;
  const float* lse1;
  const float* lse2;
  void* out;
  float* lse;
  int64_t rows;
  int head_dim;  // a multiple of 8
};

// Selection: pooling into fp32 workspaces, block scores, then top-k / cdf per query block.
struct SelectParams {
  const void* q;
  const void* k;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  float* q_pooled;  // [B, H, Nq, D]
  float* k_pooled;  // [B, H, Nk, D]
  float* scores;    // [B, H, Nq, Nk]
  int32_t* indices;  // [B, H, Nq, width]
  int32_t* counts;   // [B, H, Nq]
  // [1 + B*H] int32 for run_select's one-launch path (select.cuh, topk_pooled_kernel): the pooling
  // claim counter, then per (batch, head) the pooled units done. run_select zeroes it; may be null.
  int32_t* pool_sync;
  int batch, heads, head_dim;
  Geometry geom_q, geom_k;
  int topk;             // K of the top-k rule; 0 in pure cdf mode
  float cdf_threshold;  // <= 0: no cdf rule
  int width;            // Kmax, the last dim of indices
};

// Block-sparse backward: dq from each query block's key blocks, dk/dv from each key block's
// query blocks (the inverse index built by run_invert). Gradients are contiguous [B, H, S, D].
struct BackwardParams {
  const void* q;
  const void* k;
  const void* v;
  const void* out;
  const void* dout;
  const float* lse;   // [B, H, Sq] contiguous
  float* delta;       // [B, H, Sq] workspace: rowsum(dout * out) in fp32
  void* dq;
  void* dk;
  void* dv;
  const int32_t* indices;   // [B, H, Nq, kmax] contiguous
  const int32_t* counts;    // [B, H, Nq] contiguous
  const int32_t* qlist;     // [B*H, Nq*kmax]: query blocks per key block, ascending (run_invert)
  const int32_t* qoffsets;  // [B*H, Nk+1]: key block j owns qlist[row, qoffsets[j] .. qoffsets[j+1])
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  int batch, heads, seq_q, seq_k, kmax;
  Geometry geom_q, geom_k;
  float sm_scale;
  float scale_log2;
  int kv_buffers;  // K/V stages of the sm80 dq kernel: 2, 1, or 0 to let run_backward choose (api.h)
};

// Inverse block index: for every (batch*head row, key block) the query blocks whose first
// counts[q] entries name it, ascending (a repeated id is listed as often as it is repeated).
struct InvertParams {
  const int32_t* indices;  // [rows, Nq, kmax]
  const int32_t* counts;   // [rows, Nq]
  int32_t* degree;         // [rows, Nk] workspace
  int32_t* qoffsets;       // [rows, Nk+1]
  int32_t* qlist;          // [rows, Nq*kmax]
  int rows, nq, nk, kmax;
};

enum class DType { kFloat16, kBFloat16 };

}  // namespace bsa
