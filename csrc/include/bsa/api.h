// Host-side launcher declarations: what bindings_cuda.cpp (a plain C++ file) may call.
// Definitions live in the .cuh headers; each instantiation has its own generated .cu file.
#pragma once

#include "bsa/params.h"

namespace bsa {

// Returns cudaSuccess or the launch error; never synchronises.
template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_forward(const ForwardParams& params, cudaStream_t stream);

// Pools q and k, scores all block pairs and selects per query block; never synchronises.
template <DType kDType, int kHeadDim>
cudaError_t run_select(const SelectParams& params, cudaStream_t stream);
// The pooling alone: params.q over params.geom_q into params.q_pooled ([B, H, N, D] fp32).
template <DType kDType, int kHeadDim>
cudaError_t run_pool(const SelectParams& params, cudaStream_t stream);
// The scores and choice alone, from params.q_pooled / k_pooled already filled ([B, H, N, D]
// fp32); params.q, params.k and the strides are not read.
template <int kHeadDim>
cudaError_t run_rank(const SelectParams& params, cudaStream_t stream);

// Shared memory the system reserves for every resident CTA (sm_80 and newer), on top of its own.
constexpr int kReservedSmemPerCta = 1024;

// Top-k selection without the score matrix in global memory (select.cuh, topk_fused_kernel):
// a CTA scores 16 query blocks against every key block and keeps the scores in shared memory
// as order keys (16 x Nk rounded up to 4), then chooses with each row's keys in registers (at
// most 44 a lane: Nk <= 1408; with 96 a lane, Nk = 2640 measured 3.73 ms against 3.07 for the
// score matrix in global memory, on H100). Before the keys, one region serves the q fragments
// (head_dim x 16 words) while scoring, and 8 warps' histograms (256 words) and
// candidates (128) while choosing.
constexpr int kSelectFusedRows = 16;
constexpr int kSelectFusedMaxKeys = 1408;
constexpr int select_fused_scratch_bytes(int head_dim) {
  return head_dim * kSelectFusedRows * 4 > 8 * (256 + 128) * 4 ? head_dim * kSelectFusedRows * 4 : 8 * (256 + 128) * 4;
}
constexpr int select_fused_smem_bytes(int head_dim, int nk) {
  return kSelectFusedRows * ((nk + 3) & ~3) * 4 + select_fused_scratch_bytes(head_dim);
}
// Whether top-k selection takes the fused path on a device with `smem_per_sm` bytes of shared
// memory per SM: only where two CTAs fit on an SM (each also takes 1 KB the system reserves),
// the configuration measured faster than the score matrix in global memory (one CTA per SM was
// slower on H100). cdf modes never do: their choosers need the whole row's masses.
constexpr bool select_fused_applies(int head_dim, int nk, bool cdf, int smem_per_sm) {
  return !cdf && nk <= kSelectFusedMaxKeys && 2 * (select_fused_smem_bytes(head_dim, nk) + kReservedSmemPerCta) <= smem_per_sm;
}
// run_select's one launch for pooling and top-k ranking (select.cuh, topk_pooled_kernel): each
// thread streams rows through kSelectPoolDepth private 16-byte cp.async slots (256 threads), and
// the q and k row tables (8 bytes a row) follow; the ranking reuses the same memory afterwards.
constexpr int kSelectPoolDepth = 24;
constexpr int kSelectPoolBatch = 4;  // rows per commit group: capacities must be multiples of it
constexpr int kSelectPoolRingBytes = kSelectPoolDepth * 256 * 16;
constexpr int select_pooled_smem_bytes(int head_dim, int nk, int cap_q, int cap_k) {
  return select_fused_smem_bytes(head_dim, nk) > kSelectPoolRingBytes + 8 * (cap_q + cap_k)
             ? select_fused_smem_bytes(head_dim, nk)
             : kSelectPoolRingBytes + 8 * (cap_q + cap_k);
}
constexpr bool select_pooled_applies(int head_dim, int nk, int cap_q, int cap_k, bool cdf, int smem_per_sm) {
  return select_fused_applies(head_dim, nk, cdf, smem_per_sm) && cap_q % kSelectPoolBatch == 0 &&
         cap_k % kSelectPoolBatch == 0 &&
         2 * (select_pooled_smem_bytes(head_dim, nk, cap_q, cap_k) + kReservedSmemPerCta) <= smem_per_sm;
}
// An attribute of the current device (0 if it cannot be read).
inline int current_device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) return 0;
  return value;
}
inline int current_device_sm_count() { return current_device_attribute(cudaDevAttrMultiProcessorCount); }
inline int current_device_smem_per_sm() {
  return current_device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
}

// Backward: delta = rowsum(dout * out), then dq and dk/dv; needs params.qlist/qoffsets from
// run_invert on the same stream. Deterministic (no atomics); never synchronises.
template <DType kDType, int kHeadDim, int kCapQ, int kCapK>
cudaError_t run_backward(const BackwardParams& params, cudaStream_t stream);

// out, lse of two partial attentions merged by their log-sum-exp (SPEC §3 over the union).
template <DType kDType>
cudaError_t run_merge(const MergeParams& params, cudaStream_t stream);

// Orders each row's query blocks by descending count for the Hopper forward (no host sync).
cudaError_t run_schedule(const ScheduleParams& params, cudaStream_t stream);
// Query blocks per row the schedule orders (a 16-bit bucket each in shared memory); above it
// the forward takes them in id order, which computes the same, only less evenly paired.
constexpr int kScheduleMaxQueryBlocks = 64 * 1024;

// Builds the inverse block index on the device (no host synchronisation).
cudaError_t run_invert(const InvertParams& params, cudaStream_t stream);
// Query blocks the inverse index can sort (its shared-memory counters, one per query block).
constexpr int kInvertMaxQueryBlocks = 48 * 1024;

// Dynamic shared memory of the backward kernels: dq holds Q, dO and two stages of K, V (one
// with `kv_buffers` 1); dk/dv holds K, V and double-buffered Q, dO with their lse / delta
// rows; each also tables the byte offsets of the rows it gathers every step (K, V for dq; Q,
// dO for dk/dv: two 32-bit tables, 8 bytes a row), after the 8-byte row coordinates of both
// blocks.
constexpr int backward_dq_smem_bytes(int head_dim, int cap_q, int cap_k, int kv_buffers = 2) {
  return 2 * (2 * cap_q * head_dim + 2 * kv_buffers * cap_k * head_dim) + 8 * (cap_q + cap_k) + 8 * cap_k;
}
constexpr int backward_dkdv_smem_bytes(int head_dim, int cap_q, int cap_k) {
  return 2 * (2 * cap_k * head_dim + 4 * cap_q * head_dim) + 16 * cap_q + 8 * (cap_q + cap_k) + 8 * cap_q;
}

// Dynamic shared memory of the forward kernels: 16 query rows per warp with double-buffered
// K/V (128-key chunks), or 32 rows per warp with one K and one V buffer, or one buffer they
// take in turn (64-key chunks, `kv_buffers` 2 or 1); all with the row coordinates of both
// blocks (8 bytes a row) and tables of the K and V rows' byte offsets (two 32-bit tables, 8
// bytes a key row).
constexpr int forward_smem_bytes_narrow(int head_dim, int cap_q, int cap_k) {
  return 2 * (cap_q * head_dim + 4 * cap_k * head_dim) + 8 * (cap_q + cap_k) + 8 * cap_k;
}
constexpr int forward_smem_bytes_wide(int head_dim, int cap_q, int cap_k, int kv_buffers = 2) {
  return 2 * (cap_q * head_dim + kv_buffers * cap_k * head_dim) + 8 * (cap_q + cap_k) + 8 * cap_k;
}
// K/V buffering of an sm80-family kernel on a device with `smem_per_sm` bytes of shared memory
// per SM: one buffer (or stage) where that fits more of the `target_ctas` CTAs an SM the kernel
// reaches on an H100 than two buffers do, else two. Measured on an H100 with its carveout set to
// an A100's 164 KB (docs/PERF.md, session 13): the 64-key forward with one buffer, 4 CTAs
// against 3, 9% faster; the dq kernel with one stage, 2 CTAs against 1, 30% faster. At 228 KB
// both variants with one buffer are 5-7% slower, so an H100 keeps two.
constexpr int kv_buffers_for(int one_buffer_bytes, int two_buffer_bytes, int target_ctas, int smem_per_sm) {
  const auto ctas = [&](int bytes) {
    const int fit = smem_per_sm / (bytes + kReservedSmemPerCta);
    return fit < target_ctas ? fit : target_ctas;
  };
  return ctas(one_buffer_bytes) > ctas(two_buffer_bytes) ? 1 : 2;
}
constexpr int wide_forward_kv_buffers(int head_dim, int cap_q, int cap_k, int max_ctas, int smem_per_sm) {
  return kv_buffers_for(forward_smem_bytes_wide(head_dim, cap_q, cap_k, 1),
                        forward_smem_bytes_wide(head_dim, cap_q, cap_k, 2), max_ctas, smem_per_sm);
}
// The dq kernel reaches 2 CTAs an SM on an H100 with 64-row query blocks, 1 with 128.
constexpr int dq_target_ctas(int cap_q) { return cap_q == 64 ? 2 : 1; }
constexpr int dq_kv_buffers(int head_dim, int cap_q, int cap_k, int smem_per_sm) {
  return kv_buffers_for(backward_dq_smem_bytes(head_dim, cap_q, cap_k, 1), backward_dq_smem_bytes(head_dim, cap_q, cap_k, 2),
                        dq_target_ctas(cap_q), smem_per_sm);
}
static_assert(dq_kv_buffers(128, 64, 64, 228 * 1024) == 2, "H100: two two-stage dq CTAs fit");
static_assert(dq_kv_buffers(128, 64, 64, 164 * 1024) == 1, "A100: one two-stage dq CTA, two one-stage");
static_assert(dq_kv_buffers(128, 128, 64, 228 * 1024) == 2, "128-row blocks: one CTA, as on an H100");
static_assert(wide_forward_kv_buffers(128, 64, 64, 4, 228 * 1024) == 2, "H100: four two-buffer CTAs fit");
static_assert(wide_forward_kv_buffers(128, 64, 64, 4, 164 * 1024) == 1, "A100: three two-buffer CTAs, four one-buffer");
static_assert(wide_forward_kv_buffers(128, 128, 64, 2, 164 * 1024) == 2, "A100, 128-row blocks: two CTAs either way");
static_assert(wide_forward_kv_buffers(128, 64, 64, 4, 100 * 1024) == 1, "100 KB (sm_86/89): one CTA against two");
constexpr int forward_smem_bytes(int head_dim, int cap_q, int cap_k, int kv_buffers = 2) {
  return cap_k == 64 ? forward_smem_bytes_wide(head_dim, cap_q, cap_k, kv_buffers)
                     : forward_smem_bytes_narrow(head_dim, cap_q, cap_k);
}

}  // namespace bsa
