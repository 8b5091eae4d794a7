// CUDA implementations of the private kernel ops bsa::cuda_select_blocks, bsa::cuda_pool_blocks,
// bsa::cuda_select_pooled, bsa::cuda_merge, bsa::cuda_forward and bsa::cuda_backward (schemas: csrc/schema.cpp). Stable ABI only: this file checks what
// the kernels assume, allocates outputs through torch, fills the params structs of
// csrc/include/bsa/params.h and launches on the current stream. No host synchronisation.
#ifndef USE_CUDA
#define USE_CUDA  // exposes aoti_torch_get_current_cuda_stream in the shim header
#endif

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstdlib>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bsa/api.h"
#include "bsa/params.h"
#include "../instantiations/dispatch.inc"

namespace {

using torch::stable::Tensor;
using torch::headeronly::ScalarType;

bsa::Geometry to_geometry(const std::vector<int64_t>& g, const char* name) {
  STD_TORCH_CHECK(g.size() == 9, name, ": expected 9 ints [T,H,W,t,h,w,Nt,Nh,Nw], got ", g.size());
  for (int64_t x : g) STD_TORCH_CHECK(x > 0 && x < (1 << 30), name, ": entries must be positive, got ", x);
  bsa::Geometry r{int(g[0]), int(g[1]), int(g[2]), int(g[3]), int(g[4]), int(g[5]), int(g[6]), int(g[7]), int(g[8])};
  STD_TORCH_CHECK(r.t < 1024 && r.h < 1024 && r.w < 1024, name, ": chunk sides must be < 1024");
  STD_TORCH_CHECK(r.Nt == (r.T + r.t - 1) / r.t && r.Nh == (r.H + r.h - 1) / r.h && r.Nw == (r.W + r.w - 1) / r.w,
                  name, ": grid does not match latent / chunk");
  return r;
}

bsa::DType to_dtype(const Tensor& x, const char* name) {
  const ScalarType st = x.scalar_type();
  if (st == ScalarType::Half) return bsa::DType::kFloat16;
  if (st == ScalarType::BFloat16) return bsa::DType::kBFloat16;
  STD_TORCH_CHECK(false, name, ": CUDA kernels take float16 or bfloat16");
  return bsa::DType::kFloat16;
}

// q/k/v views: 4-d on the GPU, unit last stride, rows and base 16-byte aligned (cp.async / int4 loads).
void check_qkv(const Tensor& x, const char* name, int64_t seq_len, int device) {
  STD_TORCH_CHECK(x.is_cuda(), name, ": expected a CUDA tensor");
  STD_TORCH_CHECK(x.get_device_index() == device, name, ": all tensors must be on one device");
  STD_TORCH_CHECK(x.dim() == 4, name, ": expected [B, H, S, D], got ", x.dim(), " dims");
  STD_TORCH_CHECK(x.size(2) == seq_len, name, ": sequence length ", x.size(2), " != latent volume ", seq_len);
  STD_TORCH_CHECK(x.stride(3) == 1, name, ": the last dimension must be contiguous (stride 1)");
  for (int d = 0; d < 3; ++d)
    STD_TORCH_CHECK(x.stride(d) % 8 == 0 || x.size(d) == 1, name, ": stride(", d, ") = ", x.stride(d),
                    " is not a multiple of 8 elements (rows must be 16-byte aligned)");
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0, name, ": data pointer not 16-byte aligned");
}

int64_t stride_or_zero(const Tensor& x, int d) { return x.size(d) == 1 ? 0 : x.stride(d); }

// Element strides of a [B, H, S, D] view as the params structs hold them (0 for size-1 dims).
void strides_of(const Tensor& x, int64_t* batch, int64_t* head, int64_t* row) {
  *batch = stride_or_zero(x, 0), *head = stride_or_zero(x, 1), *row = x.stride(2);
}

// What both attention kernels assume of q, k, v (and of out / dout, which are shaped like q):
// checks them and returns the dtype with B, H, D.
struct AttentionShape {
  bsa::DType dtype;
  int64_t B, H, D;
};
using Named = std::pair<const Tensor*, const char*>;
AttentionShape check_attention(const Tensor& q, const Tensor& k, const Tensor& v, const std::vector<Named>& like_q,
                               int64_t sq, int64_t sk, int device, double sm_scale) {
  // The kernels take row maxima of raw scores, which is the softmax max only for a positive scale.
  STD_TORCH_CHECK(sm_scale > 0 && std::isfinite(sm_scale), "sm_scale must be positive and finite, got ", sm_scale);
  check_qkv(q, "q", sq, device);
  check_qkv(k, "k", sk, device);
  check_qkv(v, "v", sk, device);
  for (const Named& x : like_q) check_qkv(*x.first, x.second, sq, device);
  const AttentionShape r{to_dtype(q, "q"), q.size(0), q.size(1), q.size(3)};
  std::vector<Named> others{{&k, "k"}, {&v, "v"}};
  others.insert(others.end(), like_q.begin(), like_q.end());
  for (const Named& x : others) {
    STD_TORCH_CHECK(x.first->scalar_type() == q.scalar_type(), x.second, ": dtype differs from q's");
    STD_TORCH_CHECK(x.first->size(0) == r.B && x.first->size(1) == r.H && x.first->size(3) == r.D, x.second,
                    ": batch/heads/head_dim differ from q's");
  }
  STD_TORCH_CHECK(r.B * r.H < 65536, "batch*heads: expected < 65536, got ", r.B * r.H);
  return r;
}

cudaStream_t current_stream(int device) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device, &stream) == AOTI_TORCH_SUCCESS,
                  "bsa: could not get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// The Hopper kernel families are tried on sm_90 devices unless env BSA_DISABLE_SM90 is set (read at
// every call, so A/B tests can flip it); it declines itself when its machine code or TMA can't run.
bool try_sm90(int device) {
  if (bsa::kNumSm90Forward == 0) return false;
  const char* off = std::getenv("BSA_DISABLE_SM90");
  if (off != nullptr && off[0] != '\0' && std::string(off) != "0") return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9;
}

// K/V buffers of the sm80 64-key forward and stages of the sm80 dq kernel: env
// BSA_SM80_KV_BUFFERS = 1 or 2 (read at every call, so tests can run both variants on one GPU);
// unset or empty lets run_forward / run_backward choose by the device's shared memory per SM (0).
int sm80_kv_buffers() {
  const char* env = std::getenv("BSA_SM80_KV_BUFFERS");
  if (env == nullptr || env[0] == '\0') return 0;
  const std::string value(env);
  STD_TORCH_CHECK(value == "1" || value == "2", "BSA_SM80_KV_BUFFERS: expected 1 or 2 (or unset), got '", value,
                  "'");
  return value == "1" ? 1 : 2;
}

Tensor int_block_tensor(const Tensor& x, const char* name, std::vector<int64_t> shape, int device) {
  STD_TORCH_CHECK(x.is_cuda() && x.get_device_index() == device, name, ": expected a tensor on the device of q");
  STD_TORCH_CHECK(x.scalar_type() == ScalarType::Int, name, ": expected int32");
  STD_TORCH_CHECK(x.dim() == static_cast<int64_t>(shape.size()), name, ": expected ", shape.size(), " dims");
  for (size_t i = 0; i < shape.size(); ++i)
    STD_TORCH_CHECK(shape[i] < 0 || x.size(i) == shape[i], name, ": dim ", i, " is ", x.size(i), ", expected ",
                    shape[i]);
  return x.is_contiguous() ? x : torch::stable::contiguous(x);
}

std::tuple<Tensor, Tensor> cuda_forward(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts,
                                        std::vector<int64_t> geom_q, std::vector<int64_t> geom_k, double sm_scale) {
  const bsa::Geometry gq = to_geometry(geom_q, "geom_q"), gk = to_geometry(geom_k, "geom_k");
  const int device = q.get_device_index();
  const int64_t sq = int64_t(gq.T) * gq.H * gq.W, sk = int64_t(gk.T) * gk.H * gk.W;
  const auto [dt, B, H, D] = check_attention(q, k, v, {}, sq, sk, device, sm_scale);
  const int nq = gq.num_blocks();
  indices = int_block_tensor(indices, "indices", {B, H, nq, -1}, device);
  counts = int_block_tensor(counts, "counts", {B, H, nq}, device);

  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor out = torch::stable::new_empty(q, {B, H, sq, D});
  Tensor lse = torch::stable::new_empty(q, {B, H, sq}, ScalarType::Float);

  bsa::ForwardParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = static_cast<float*>(lse.data_ptr());
  p.indices = static_cast<const int32_t*>(indices.data_ptr());
  p.counts = static_cast<const int32_t*>(counts.data_ptr());
  strides_of(q, &p.q_batch_stride, &p.q_head_stride, &p.q_row_stride);
  strides_of(k, &p.k_batch_stride, &p.k_head_stride, &p.k_row_stride);
  strides_of(v, &p.v_batch_stride, &p.v_head_stride, &p.v_row_stride);
  p.out_batch_stride = H * sq * D, p.out_head_stride = sq * D, p.out_row_stride = D;
  p.batch = int(B), p.heads = int(H), p.seq_q = int(sq), p.seq_k = int(sk), p.kmax = int(indices.size(3));
  p.geom_q = gq, p.geom_k = gk;
  p.sm_scale = float(sm_scale);
  p.scale_log2 = float(sm_scale * 1.4426950408889634);
  p.kv_buffers = sm80_kv_buffers();
  if (B * H * sq == 0) return {out, lse};

  const cudaStream_t stream = current_stream(device);
  const bool sm90 = try_sm90(device);
  Tensor order;  // the Hopper kernel's launch order of the query blocks (longest lists first)
  if (sm90 && nq <= bsa::kScheduleMaxQueryBlocks) {
    order = torch::stable::new_empty(q, {B, H, nq}, ScalarType::Int);
    const bsa::ScheduleParams sp{p.counts, static_cast<int32_t*>(order.data_ptr()), int(B * H), nq, p.kmax};
    const cudaError_t e = bsa::run_schedule(sp, stream);
    STD_TORCH_CHECK(e == cudaSuccess, "bsa cuda_forward: schedule launch failed: ", cudaGetErrorString(e));
    p.order = sp.order;
  }
  cudaError_t err = cudaSuccess;
  const bool found = bsa::dispatch_forward(dt, int(D), gq.capacity(), gk.capacity(), p, stream, &err, sm90);
  STD_TORCH_CHECK(found, "bsa cuda_forward: no kernel for head_dim=", D, ", capacity q=", gq.capacity(),
                  ", k=", gk.capacity(), "; compiled: ", bsa::kCompiledForward);
  STD_TORCH_CHECK(err == cudaSuccess, "bsa cuda_forward: launch failed: ", cudaGetErrorString(err),
                  " (the sm80-family kernel for these capacities takes up to ",
                  bsa::forward_smem_bytes(int(D), gq.capacity(), gk.capacity(), p.kv_buffers == 1 ? 1 : 2),
                  " bytes of shared memory a CTA)");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> cuda_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,
                                                 Tensor indices, Tensor counts, std::vector<int64_t> geom_q,
                                                 std::vector<int64_t> geom_k, double sm_scale) {
  const bsa::Geometry gq = to_geometry(geom_q, "geom_q"), gk = to_geometry(geom_k, "geom_k");
  const int device = q.get_device_index();
  const int64_t sq = int64_t(gq.T) * gq.H * gq.W, sk = int64_t(gk.T) * gk.H * gk.W;
  const auto [dt, B, H, D] = check_attention(q, k, v, {{&out, "out"}, {&dout, "dout"}}, sq, sk, device, sm_scale);
  STD_TORCH_CHECK(lse.is_cuda() && lse.get_device_index() == device && lse.scalar_type() == ScalarType::Float &&
                      lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H && lse.size(2) == sq,
                  "lse: expected float32 [B, H, Sq] on the device of q");
  lse = lse.is_contiguous() ? lse : torch::stable::contiguous(lse);
  const int nq = gq.num_blocks(), nk = gk.num_blocks();
  indices = int_block_tensor(indices, "indices", {B, H, nq, -1}, device);
  counts = int_block_tensor(counts, "counts", {B, H, nq}, device);
  const int64_t kmax = indices.size(3);
  STD_TORCH_CHECK(nq <= bsa::kInvertMaxQueryBlocks, "bsa cuda_backward: ", nq, " query blocks exceed the ",
                  bsa::kInvertMaxQueryBlocks, " that the inverse index sorts in shared memory");
  STD_TORCH_CHECK(int64_t(nq) * kmax < (int64_t(1) << 31), "bsa cuda_backward: Nq * Kmax must be < 2^31");

  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor dq = torch::stable::new_empty(q, {B, H, sq, D});
  Tensor dk = torch::stable::new_empty(q, {B, H, sk, D});
  Tensor dv = torch::stable::new_empty(q, {B, H, sk, D});
  if (B * H == 0) return {dq, dk, dv};
  // Workspaces: delta rows, then the inverse index (fixed capacity: Nq * Kmax entries per row).
  Tensor delta = torch::stable::new_empty(q, {B, H, sq}, ScalarType::Float);
  Tensor degree = torch::stable::new_empty(q, {B * H, nk}, ScalarType::Int);
  Tensor qoffsets = torch::stable::new_empty(q, {B * H, nk + 1}, ScalarType::Int);
  Tensor qlist = torch::stable::new_empty(q, {B * H, std::max<int64_t>(1, nq * kmax)}, ScalarType::Int);
  const cudaStream_t stream = current_stream(device);

  bsa::InvertParams ip{};
  ip.indices = static_cast<const int32_t*>(indices.data_ptr());
  ip.counts = static_cast<const int32_t*>(counts.data_ptr());
  ip.degree = static_cast<int32_t*>(degree.data_ptr());
  ip.qoffsets = static_cast<int32_t*>(qoffsets.data_ptr());
  ip.qlist = static_cast<int32_t*>(qlist.data_ptr());
  ip.rows = int(B * H), ip.nq = nq, ip.nk = nk, ip.kmax = int(kmax);
  cudaError_t err = bsa::run_invert(ip, stream);
  STD_TORCH_CHECK(err == cudaSuccess, "bsa cuda_backward: inverse index launch failed: ", cudaGetErrorString(err));

  bsa::BackwardParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = static_cast<const float*>(lse.data_ptr());
  p.delta = static_cast<float*>(delta.data_ptr());
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.indices = ip.indices;
  p.counts = ip.counts;
  p.qlist = ip.qlist;
  p.qoffsets = ip.qoffsets;
  strides_of(q, &p.q_batch_stride, &p.q_head_stride, &p.q_row_stride);
  strides_of(k, &p.k_batch_stride, &p.k_head_stride, &p.k_row_stride);
  strides_of(v, &p.v_batch_stride, &p.v_head_stride, &p.v_row_stride);
  strides_of(out, &p.out_batch_stride, &p.out_head_stride, &p.out_row_stride);
  strides_of(dout, &p.dout_batch_stride, &p.dout_head_stride, &p.dout_row_stride);
  p.batch = int(B), p.heads = int(H), p.seq_q = int(sq), p.seq_k = int(sk), p.kmax = int(kmax);
  p.geom_q = gq, p.geom_k = gk;
  p.sm_scale = float(sm_scale);
  p.scale_log2 = float(sm_scale * 1.4426950408889634);
  p.kv_buffers = sm80_kv_buffers();

  const bool found = bsa::dispatch_backward(dt, int(D), gq.capacity(), gk.capacity(), p, stream, &err, try_sm90(device));
  STD_TORCH_CHECK(found, "bsa cuda_backward: no kernel for head_dim=", D, ", capacity q=", gq.capacity(),
                  ", k=", gk.capacity(), "; compiled: ", bsa::kCompiledForward);
  STD_TORCH_CHECK(err == cudaSuccess, "bsa cuda_backward: launch failed: ", cudaGetErrorString(err), " (needs ",
                  bsa::backward_dkdv_smem_bytes(int(D), gq.capacity(), gk.capacity()), " bytes of shared memory)");
  return {dq, dk, dv};
}

// The fields of SelectParams both selection entry points fill alike: workspaces, outputs and
// the rule (the pooling inputs and the geometries are theirs).
void set_choice(bsa::SelectParams& p, const Tensor& q_pooled, const Tensor& k_pooled, const Tensor& scores,
                const Tensor& indices, const Tensor& counts, int64_t topk, double cdf_threshold, int64_t width) {
  p.q_pooled = static_cast<float*>(q_pooled.data_ptr());
  p.k_pooled = static_cast<float*>(k_pooled.data_ptr());
  p.scores = static_cast<float*>(scores.data_ptr());
  p.indices = static_cast<int32_t*>(indices.data_ptr());
  p.counts = static_cast<int32_t*>(counts.data_ptr());
  p.topk = int(topk);
  p.cdf_threshold = cdf_threshold > 0 ? float(cdf_threshold) : -1.f;
  p.width = int(width);
}

// The [B, H, Nq, Nk] fp32 score matrix, or an empty tensor where the fused top-k path keeps
// the scores in shared memory (run_rank makes the same choice on the same device).
Tensor score_workspace(const Tensor& like, int64_t B, int64_t H, int64_t nq, int64_t nk, int64_t D,
                       double cdf_threshold) {
  const bool fused = bsa::select_fused_applies(int(D), int(nk), cdf_threshold > 0, bsa::current_device_smem_per_sm());
  return torch::stable::new_empty(like, fused ? std::vector<int64_t>{0} : std::vector<int64_t>{B, H, nq, nk},
                                  ScalarType::Float);
}

// The selection limits both entry points share (the choosers' shared memory and 16-bit counts).
void check_select_sizes(int64_t B, int64_t H, int64_t nk, int64_t topk, int64_t width) {
  STD_TORCH_CHECK(B * H < 65536, "batch*heads: expected < 65536, got ", B * H);
  STD_TORCH_CHECK(width >= 0 && width <= nk, "width must be in [0, Nk], got ", width);
  STD_TORCH_CHECK(topk >= 0 && topk <= nk, "topk must be in [0, Nk], got ", topk);
  STD_TORCH_CHECK(nk < 65536 && nk * 4 <= 200 * 1024, "Nk = ", nk, " key blocks exceed the selection kernel's shared memory");
}

// The outcome of a launch through the selection family's dispatch tables (select, rank, pool):
// no instantiation for this head dim, or a launch error, is reported under the op's name.
void check_select_launch(const char* op, bool found, cudaError_t err, int64_t D) {
  STD_TORCH_CHECK(found, "bsa ", op, ": no kernel for head_dim=", D, "; compiled: ", bsa::kCompiledSelect);
  STD_TORCH_CHECK(err == cudaSuccess, "bsa ", op, ": launch failed: ", cudaGetErrorString(err));
}

std::tuple<Tensor, Tensor> cuda_select_blocks(Tensor q, Tensor k, std::vector<int64_t> geom_q,
                                              std::vector<int64_t> geom_k, int64_t topk, double cdf_threshold,
                                              int64_t width) {
  const bsa::Geometry gq = to_geometry(geom_q, "geom_q"), gk = to_geometry(geom_k, "geom_k");
  const int device = q.get_device_index();
  const int64_t sq = int64_t(gq.T) * gq.H * gq.W, sk = int64_t(gk.T) * gk.H * gk.W;
  check_qkv(q, "q", sq, device);
  check_qkv(k, "k", sk, device);
  const bsa::DType dt = to_dtype(q, "q");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type(), "q, k: dtypes differ");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  STD_TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D, "k: batch/heads/head_dim differ from q");
  const int64_t nq = gq.num_blocks(), nk = gk.num_blocks();
  check_select_sizes(B, H, nk, topk, width);
  STD_TORCH_CHECK(gq.capacity() <= 256 && gk.capacity() <= 256, "chunk capacity must be <= 256 for selection");

  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor indices = torch::stable::new_empty(q, {B, H, nq, width}, ScalarType::Int);
  Tensor counts = torch::stable::new_empty(q, {B, H, nq}, ScalarType::Int);
  if (B * H * nq == 0) return {indices, counts};
  // Workspaces: pooled blocks and the score matrix (none on the fused top-k path), freed back to
  // torch's caching allocator.
  Tensor q_pooled = torch::stable::new_empty(q, {B, H, nq, D}, ScalarType::Float);
  Tensor k_pooled = torch::stable::new_empty(q, {B, H, nk, D}, ScalarType::Float);
  Tensor scores = score_workspace(q, B, H, nq, nk, D, cdf_threshold);
  // Counters of the one-launch pooling and ranking path (zeroed by run_select when it applies).
  Tensor pool_sync = torch::stable::new_empty(q, {1 + B * H}, ScalarType::Int);

  bsa::SelectParams p{};
  p.pool_sync = static_cast<int32_t*>(pool_sync.data_ptr());
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  strides_of(q, &p.q_batch_stride, &p.q_head_stride, &p.q_row_stride);
  strides_of(k, &p.k_batch_stride, &p.k_head_stride, &p.k_row_stride);
  set_choice(p, q_pooled, k_pooled, scores, indices, counts, topk, cdf_threshold, width);
  p.batch = int(B), p.heads = int(H), p.head_dim = int(D);
  p.geom_q = gq, p.geom_k = gk;

  cudaError_t err = cudaSuccess;
  const bool found = bsa::dispatch_select(dt, int(D), p, current_stream(device), &err);
  check_select_launch("cuda_select_blocks", found, err, D);
  return {indices, counts};
}

std::tuple<Tensor, Tensor> cuda_select_pooled(Tensor q_pooled, Tensor k_pooled, int64_t topk, double cdf_threshold,
                                              int64_t width) {
  const int device = q_pooled.get_device_index();
  const std::pair<const Tensor*, const char*> named[] = {{&q_pooled, "q_pooled"}, {&k_pooled, "k_pooled"}};
  for (const auto& [x, name] : named) {
    STD_TORCH_CHECK(x->is_cuda() && x->get_device_index() == device, name, ": expected a CUDA tensor on device ", device);
    STD_TORCH_CHECK(x->scalar_type() == ScalarType::Float, name, ": expected float32 pooled blocks");
    STD_TORCH_CHECK(x->dim() == 4 && x->is_contiguous(), name, ": expected a contiguous [B, H, N, D] tensor");
    STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0, name, ": data pointer not 16-byte aligned");
  }
  const int64_t B = q_pooled.size(0), H = q_pooled.size(1), nq = q_pooled.size(2), D = q_pooled.size(3);
  const int64_t nk = k_pooled.size(2);
  STD_TORCH_CHECK(k_pooled.size(0) == B && k_pooled.size(1) == H && k_pooled.size(3) == D,
                  "k_pooled: batch/heads/head_dim differ from q_pooled");
  check_select_sizes(B, H, nk, topk, width);
  STD_TORCH_CHECK(nq < (1 << 30), "q_pooled: too many query blocks");

  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor indices = torch::stable::new_empty(q_pooled, {B, H, nq, width}, ScalarType::Int);
  Tensor counts = torch::stable::new_empty(q_pooled, {B, H, nq}, ScalarType::Int);
  if (B * H * nq == 0 || nk == 0) {
    // No key block to choose: every count is 0 (the attention then gives 0 / -inf).
    torch::stable::fill_(counts, 0.0);
    torch::stable::fill_(indices, -1.0);
    return {indices, counts};
  }
  Tensor scores = score_workspace(q_pooled, B, H, nq, nk, D, cdf_threshold);
  bsa::SelectParams p{};
  set_choice(p, q_pooled, k_pooled, scores, indices, counts, topk, cdf_threshold, width);
  p.batch = int(B), p.heads = int(H), p.head_dim = int(D);
  // Only the block counts matter to the scores and the choosers: one row of N blocks.
  p.geom_q = bsa::Geometry{int(nq), 1, 1, 1, 1, 1, int(nq), 1, 1};
  p.geom_k = bsa::Geometry{int(nk), 1, 1, 1, 1, 1, int(nk), 1, 1};

  cudaError_t err = cudaSuccess;
  const bool found = bsa::dispatch_rank(int(D), p, current_stream(device), &err);
  check_select_launch("cuda_select_pooled", found, err, D);
  return {indices, counts};
}

Tensor cuda_pool_blocks(Tensor x, std::vector<int64_t> geom) {
  const bsa::Geometry g = to_geometry(geom, "geom");
  const int device = x.get_device_index();
  check_qkv(x, "x", int64_t(g.T) * g.H * g.W, device);
  const bsa::DType dt = to_dtype(x, "x");
  STD_TORCH_CHECK(g.capacity() <= 256, "geom: chunk capacity must be <= 256 for pooling");
  const int64_t B = x.size(0), H = x.size(1), D = x.size(3), n = g.num_blocks();
  STD_TORCH_CHECK(B * H < 65536, "batch*heads: expected < 65536, got ", B * H);
  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor pooled = torch::stable::new_empty(x, {B, H, n, D}, ScalarType::Float);
  bsa::SelectParams p{};
  p.q = x.data_ptr();
  strides_of(x, &p.q_batch_stride, &p.q_head_stride, &p.q_row_stride);
  p.q_pooled = static_cast<float*>(pooled.data_ptr());
  p.batch = int(B), p.heads = int(H), p.head_dim = int(D);
  p.geom_q = g, p.geom_k = g;
  cudaError_t err = cudaSuccess;
  const bool found = bsa::dispatch_pool(dt, int(D), p, current_stream(device), &err);
  check_select_launch("cuda_pool_blocks", found, err, D);
  return pooled;
}

std::tuple<Tensor, Tensor> cuda_merge(Tensor out1, Tensor lse1, Tensor out2, Tensor lse2) {
  const int device = out1.get_device_index();
  const std::pair<const Tensor*, const char*> named[] = {{&out1, "out1"}, {&lse1, "lse1"}, {&out2, "out2"}, {&lse2, "lse2"}};
  for (const auto& [x, name] : named) {
    STD_TORCH_CHECK(x->is_cuda() && x->get_device_index() == device, name, ": expected a CUDA tensor on device ", device);
    STD_TORCH_CHECK(x->is_contiguous(), name, ": expected a contiguous tensor");
    STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(x->data_ptr()) % 16 == 0, name, ": data pointer not 16-byte aligned");
  }
  const bsa::DType dt = to_dtype(out1, "out1");
  STD_TORCH_CHECK(out2.scalar_type() == out1.scalar_type(), "out2: dtype differs from out1");
  STD_TORCH_CHECK(out1.dim() == 4, "out1: expected [B, H, S, D], got ", out1.dim(), " dims");
  const int64_t B = out1.size(0), H = out1.size(1), S = out1.size(2), D = out1.size(3);
  STD_TORCH_CHECK(out2.dim() == 4 && out2.size(0) == B && out2.size(1) == H && out2.size(2) == S && out2.size(3) == D,
                  "out2: shape differs from out1");
  STD_TORCH_CHECK(D % 8 == 0, "out1: head dim must be a multiple of 8, got ", D);
  for (const auto& [x, name] : {named[1], named[3]}) {
    STD_TORCH_CHECK(x->scalar_type() == ScalarType::Float, name, ": expected float32");
    STD_TORCH_CHECK(x->dim() == 3 && x->size(0) == B && x->size(1) == H && x->size(2) == S, name,
                    ": expected [B, H, S] matching out1");
  }
  torch::stable::accelerator::DeviceGuard guard(device);
  Tensor out = torch::stable::new_empty(out1, {B, H, S, D});
  Tensor lse = torch::stable::new_empty(lse1, {B, H, S});
  bsa::MergeParams p{};
  p.out1 = out1.data_ptr(), p.out2 = out2.data_ptr();
  p.lse1 = static_cast<const float*>(lse1.data_ptr()), p.lse2 = static_cast<const float*>(lse2.data_ptr());
  p.out = out.data_ptr(), p.lse = static_cast<float*>(lse.data_ptr());
  p.rows = B * H * S, p.head_dim = int(D);
  cudaError_t err = cudaSuccess;
  const bool found = bsa::dispatch_merge(dt, p, current_stream(device), &err);
  STD_TORCH_CHECK(found, "bsa cuda_merge: no kernel for this dtype");
  STD_TORCH_CHECK(err == cudaSuccess, "bsa cuda_merge: launch failed: ", cudaGetErrorString(err));
  return {out, lse};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(bsa, CUDA, m) {
  m.impl("cuda_forward", TORCH_BOX(&cuda_forward));
  m.impl("cuda_select_blocks", TORCH_BOX(&cuda_select_blocks));
  m.impl("cuda_select_pooled", TORCH_BOX(&cuda_select_pooled));
  m.impl("cuda_merge", TORCH_BOX(&cuda_merge));
  m.impl("cuda_pool_blocks", TORCH_BOX(&cuda_pool_blocks));
  m.impl("cuda_backward", TORCH_BOX(&cuda_backward));
}
