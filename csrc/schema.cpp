// The one place where the bsa operator schemas are defined (SPEC §4).
//
// Built for every install, with or without a CUDA toolkit: kernels register their
// implementations elsewhere (csrc/bindings_cuda.cpp for CUDA, bsa_ext/ops.py for the
// CPU reference, the Triton path and the routing by `backend`). Only the stable ABI is
// used, so one build loads under every torch >= 2.10 and every Python >= 3.11.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(bsa, m) {
  // Public ops. `backend` is "auto", "cuda", "triton" or "torch"; geometry arguments are
  // (T, H, W) latent shapes and (t, h, w) chunk shapes.
  m.def(
      "select_blocks(Tensor q, Tensor k, int[] latent_shape_q, int[] latent_shape_k, "
      "int[] chunk_shape_q, int[] chunk_shape_k, float? sparsity, float? cdf_threshold, "
      "int? max_blocks, str backend) -> (Tensor indices, Tensor counts)");
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, "
      "int[] latent_shape_q, int[] latent_shape_k, int[] chunk_shape_q, int[] chunk_shape_k, "
      "float sm_scale, str backend) -> (Tensor out, Tensor lse)");
  m.def(
      "backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor indices, Tensor counts, int[] latent_shape_q, int[] latent_shape_k, "
      "int[] chunk_shape_q, int[] chunk_shape_k, float sm_scale, str backend) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");

  // Kernel entry points of the compiled CUDA library. Arguments arrive validated; `geom_*`
  // is [T, H, W, t, h, w, Nt, Nh, Nw]. Selection: `topk` is K (0 in pure cdf mode),
  // `cdf_threshold` <= 0 means no cdf, `width` is Kmax.
  m.def(
      "cuda_select_blocks(Tensor q, Tensor k, int[] geom_q, int[] geom_k, int topk, "
      "float cdf_threshold, int width) -> (Tensor indices, Tensor counts)");
  // The same choice from pooled blocks the caller made (fp32 [B, H, N, D], contiguous): the
  // context-parallel selection, which pools each rank's shard and gathers the pooled keys.
  m.def(
      "cuda_select_pooled(Tensor q_pooled, Tensor k_pooled, int topk, float cdf_threshold, "
      "int width) -> (Tensor indices, Tensor counts)");
  // The selection's pooling alone: fp32 [B, H, N, D] means of the valid tokens of each chunk.
  m.def("cuda_pool_blocks(Tensor x, int[] geom) -> Tensor");
  // Two partial attentions of the same queries over disjoint key sets, merged by their lse
  // (contiguous [B, H, S, D] outputs, fp32 [B, H, S] lse): the context-parallel forward.
  m.def("cuda_merge(Tensor out1, Tensor lse1, Tensor out2, Tensor lse2) -> (Tensor out, Tensor lse)");
  m.def(
      "cuda_forward(Tensor q, Tensor k, Tensor v, Tensor indices, Tensor counts, "
      "int[] geom_q, int[] geom_k, float sm_scale) -> (Tensor out, Tensor lse)");
  m.def(
      "cuda_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor indices, Tensor counts, int[] geom_q, int[] geom_k, float sm_scale) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}
