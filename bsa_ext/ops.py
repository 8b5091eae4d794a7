"""Implementations, fakes and autograd of ``torch.ops.bsa.*`` (schemas: csrc/schema.cpp).

The CPU and CUDA dispatch keys share one Python implementation per op: it validates
the arguments (SPEC §5), resolves ``backend`` against the capability table and calls
exactly that backend. An explicit backend that cannot run raises
``BackendUnavailableError`` naming why; ``"auto"`` tries CUDA, Triton, then PyTorch
and records its choice for ``last_backend()`` and the ``bsa_ext`` logger.
"""

from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Tuple

import torch

from . import _library  # noqa: F401  (loads the schemas before anything registers on them)
from . import _validate, reference
from .capabilities import BACKENDS, not_supported_reasons
from .layout import ChunkGeometry, selection_width, topk_count

log = logging.getLogger("bsa_ext")

_LAST: Dict[str, str] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message lists every reason."""


def last_backend(op: str = "forward") -> Optional[str]:
    """The backend that ran the most recent ``op`` ("select", "forward" or "backward")."""
    return _LAST.get(op)


def resolve_backend(
    requested: str,
    op: str,
    x: torch.Tensor,
    geom_q: ChunkGeometry,
    geom_k: ChunkGeometry,
    tensors: Optional[Dict[str, torch.Tensor]] = None,
) -> str:
    """The backend that will run ``op``; raises when an explicit choice cannot.

    ``x`` is q (dtype, device, head dim, batch * heads); ``tensors`` are the inputs the
    backend will read in place, checked against its layout requirements."""
    requested = _validate.backend_name(requested, os.environ.get("BSA_BACKEND"))
    args = (op, x.device, x.dtype, x.shape[-1], (geom_q.capacity, geom_k.capacity), geom_k.num_blocks, geom_q.num_blocks)
    layout = dict(batch_heads=x.shape[0] * x.shape[1], tensors=tensors)
    if requested != "auto":
        reasons = not_supported_reasons(requested, *args, **layout)
        if reasons:
            raise BackendUnavailableError(f"backend {requested!r} cannot run bsa {op}: {'; '.join(reasons)}")
        return requested
    tried: List[str] = []
    for name in BACKENDS:
        reasons = not_supported_reasons(name, *args, explicit=False, **layout)
        if not reasons:
            return name
        tried.append(f"{name}: {'; '.join(reasons)}")
    raise BackendUnavailableError(f"no backend can run bsa {op}: " + " | ".join(tried))


def _record(op: str, name: str) -> None:
    if _LAST.get(op) != name:
        log.info("bsa_ext: %s runs on the %s backend", op, name)
    _LAST[op] = name


def _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k) -> Tuple[ChunkGeometry, ChunkGeometry]:
    gq = _validate.geometry("latent_shape_q", latent_q, "chunk_3d_shape_q", chunk_q, q.shape[2], "q")
    gk = _validate.geometry("latent_shape_k", latent_k, "chunk_3d_shape_k", chunk_k, k.shape[2], "k")
    return gq, gk


# ---------------------------------------------------------------- select_blocks
def _cuda_rule(nk: int, sparsity, cdf_threshold, max_blocks) -> Tuple[int, float, int]:
    """The selection rule as the CUDA entry points take it: (topk, cdf_threshold, width), with
    topk 0 in pure cdf mode and cdf_threshold -1 without the cdf rule."""
    topk = topk_count(nk, sparsity) if sparsity is not None else 0
    cdf = -1.0 if cdf_threshold is None else cdf_threshold
    return topk, cdf, selection_width(nk, sparsity, cdf_threshold, max_blocks)


def _select_impl(q, k, latent_q, latent_k, chunk_q, chunk_k, sparsity, cdf_threshold, max_blocks, backend):
    _validate.qkv(q, k)
    gq, gk = _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    _validate.selection_params(sparsity, cdf_threshold, max_blocks)
    name = resolve_backend(backend, "select", q, gq, gk, {"q": q, "k": k})
    _record("select", name)
    if name == "cuda":
        return torch.ops.bsa.cuda_select_blocks(
            q, k, gq.as_ints(), gk.as_ints(), *_cuda_rule(gk.num_blocks, sparsity, cdf_threshold, max_blocks)
        )
    if name == "triton":
        from . import triton as tb

        return tb.select_blocks(q, k, gq, gk, sparsity, cdf_threshold, max_blocks)
    return reference.select_blocks(q, k, gq, gk, sparsity, cdf_threshold, max_blocks)


def select_pooled(q_pooled, k_pooled, like, geom_q, geom_k, sparsity, cdf_threshold, max_blocks, backend="auto"):
    """SPEC §2 selection from blocks pooled by the caller (fp32 ``[B, H, N, D]``).

    The context-parallel path pools each rank's shard and gathers the pooled keys, then
    chooses here. ``like`` is the q tensor the blocks came from: the backend is resolved
    for its dtype, device and head dim exactly as ``select_blocks`` would resolve it.
    """
    _validate.selection_params(sparsity, cdf_threshold, max_blocks)
    name = resolve_backend(backend, "select", like, geom_q, geom_k)
    _record("select", name)
    nk = k_pooled.shape[2]
    if name == "cuda":
        return torch.ops.bsa.cuda_select_pooled(
            q_pooled.float().contiguous(), k_pooled.float().contiguous(), *_cuda_rule(nk, sparsity, cdf_threshold, max_blocks)
        )
    if name == "triton":
        from . import triton as tb

        return tb.select_pooled(q_pooled, k_pooled, sparsity, cdf_threshold, max_blocks)
    scores = q_pooled @ k_pooled.transpose(-1, -2)
    return reference.select_from_scores(scores, like.shape[-1], sparsity, cdf_threshold, max_blocks)


def _select_fake(q, k, latent_q, latent_k, chunk_q, chunk_k, sparsity, cdf_threshold, max_blocks, backend):
    gq, gk = _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    _validate.selection_params(sparsity, cdf_threshold, max_blocks)
    width = selection_width(gk.num_blocks, sparsity, cdf_threshold, max_blocks)
    B, H = q.shape[:2]
    return (
        q.new_empty((B, H, gq.num_blocks, width), dtype=torch.int32),
        q.new_empty((B, H, gq.num_blocks), dtype=torch.int32),
    )


# ---------------------------------------------------------------- forward
def _forward_impl(q, k, v, indices, counts, latent_q, latent_k, chunk_q, chunk_k, sm_scale, backend):
    _validate.qkv(q, k, v)
    gq, gk = _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    _validate.block_lists(indices, counts, q, gq)
    _validate.sm_scale(sm_scale, q.shape[-1])
    name = resolve_backend(backend, "forward", q, gq, gk, {"q": q, "k": k, "v": v})
    _record("forward", name)
    if name == "cuda":
        return torch.ops.bsa.cuda_forward(q, k, v, indices, counts, gq.as_ints(), gk.as_ints(), sm_scale)
    if name == "triton":
        from . import triton as tb

        return tb.forward(q, k, v, indices, counts, gq, gk, sm_scale)
    out, lse = reference.attention_forward(q, k, v, indices, counts, gq, gk, sm_scale)
    return out.to(q.dtype), lse.to(torch.float32)


def _out_and_lse_like(q):
    """What every forward returns: contiguous ``out`` like q and fp32 ``lse [B, H, Sq]``."""
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


def _grads_like(q, k, v):
    """What every backward returns: contiguous ``dq, dk, dv`` like q, k, v."""
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _forward_fake(q, k, v, indices, counts, latent_q, latent_k, chunk_q, chunk_k, sm_scale, backend):
    _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    return _out_and_lse_like(q)


# ---------------------------------------------------------------- backward
def _backward_impl(dout, q, k, v, out, lse, indices, counts, latent_q, latent_k, chunk_q, chunk_k, sm_scale, backend):
    _validate.qkv(q, k, v)
    gq, gk = _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    _validate.block_lists(indices, counts, q, gq)
    _validate.saved_outputs(dout, out, lse, q)
    _validate.sm_scale(sm_scale, q.shape[-1])
    # Kernels index lse as a dense [B, H, Sq] array and need a unit stride on dout's head dim.
    lse = lse.contiguous()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    name = resolve_backend(backend, "backward", q, gq, gk, {"q": q, "k": k, "v": v, "out": out, "dout": dout})
    _record("backward", name)
    if name == "cuda":
        return torch.ops.bsa.cuda_backward(
            dout, q, k, v, out, lse, indices, counts, gq.as_ints(), gk.as_ints(), sm_scale
        )
    if name == "triton":
        from . import triton as tb

        return tb.backward(dout, q, k, v, out, lse, indices, counts, gq, gk, sm_scale)
    dq, dk, dv = reference.attention_backward(dout, q, k, v, indices, counts, gq, gk, sm_scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _backward_fake(dout, q, k, v, out, lse, indices, counts, latent_q, latent_k, chunk_q, chunk_k, sm_scale, backend):
    _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    return _grads_like(q, k, v)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    q, k, v, indices, counts, latent_q, latent_k, chunk_q, chunk_k, sm_scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, indices, counts)
    ctx.geometry = (latent_q, latent_k, chunk_q, chunk_k)
    ctx.sm_scale = sm_scale
    ctx.backend = backend
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, indices, counts = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.bsa.backward(
        grad_out, q, k, v, out, lse, indices, counts, *ctx.geometry, ctx.sm_scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


_lib = torch.library.Library("bsa", "IMPL")  # noqa: TOR901  (kept alive for the process)
for _op, _fn in (("select_blocks", _select_impl), ("forward", _forward_impl), ("backward", _backward_impl)):
    for _key in ("CPU", "CUDA"):
        _lib.impl(_op, _fn, _key)

torch.library.register_fake("bsa::select_blocks")(_select_fake)
torch.library.register_fake("bsa::forward")(_forward_fake)
torch.library.register_fake("bsa::backward")(_backward_fake)
torch.library.register_autograd("bsa::forward", _autograd_backward, setup_context=_setup_context)


def _fake_cuda_forward(q, k, v, indices, counts, geom_q, geom_k, sm_scale):
    return _out_and_lse_like(q)


def _fake_cuda_select(q, k, geom_q, geom_k, topk, cdf_threshold, width):
    nq = geom_q[6] * geom_q[7] * geom_q[8]
    B, H = q.shape[:2]
    return q.new_empty((B, H, nq, width), dtype=torch.int32), q.new_empty((B, H, nq), dtype=torch.int32)


def _fake_cuda_select_pooled(q_pooled, k_pooled, topk, cdf_threshold, width):
    B, H, nq = q_pooled.shape[:3]
    return q_pooled.new_empty((B, H, nq, width), dtype=torch.int32), q_pooled.new_empty((B, H, nq), dtype=torch.int32)


def _fake_cuda_pool_blocks(x, geom):
    return x.new_empty((*x.shape[:2], geom[6] * geom[7] * geom[8], x.shape[-1]), dtype=torch.float32)


def _fake_cuda_merge(out1, lse1, out2, lse2):
    return torch.empty_like(out1), torch.empty_like(lse1)


def _fake_cuda_backward(dout, q, k, v, out, lse, indices, counts, geom_q, geom_k, sm_scale):
    return _grads_like(q, k, v)


torch.library.register_fake("bsa::cuda_forward")(_fake_cuda_forward)
torch.library.register_fake("bsa::cuda_select_blocks")(_fake_cuda_select)
torch.library.register_fake("bsa::cuda_select_pooled")(_fake_cuda_select_pooled)
torch.library.register_fake("bsa::cuda_merge")(_fake_cuda_merge)
torch.library.register_fake("bsa::cuda_pool_blocks")(_fake_cuda_pool_blocks)
torch.library.register_fake("bsa::cuda_backward")(_fake_cuda_backward)
