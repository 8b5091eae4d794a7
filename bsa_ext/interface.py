"""The Python API: LongCat's ``flash_attn_bsa_3d`` and its two halves."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from . import _validate
from .ops import BackendUnavailableError, _geometries, resolve_backend

Shape = Sequence[int]


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    latent_shape_q: Shape,
    latent_shape_k: Shape,
    chunk_3d_shape_q: Shape = (4, 4, 8),
    chunk_3d_shape_k: Shape = (4, 4, 8),
    sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None,
    *,
    max_blocks: Optional[int] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick the key blocks of every query block (SPEC §2).

    Returns ``indices int32 [B, H, Nq, Kmax]`` and ``counts int32 [B, H, Nq]``; only the
    first ``counts[b, h, i]`` entries of a row are meaningful. No host synchronisation.
    """
    _validate.qkv(q, k)
    _geometries(q, k, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    _validate.selection_params(sparsity, cdf_threshold, max_blocks)
    return torch.ops.bsa.select_blocks(
        q, k, list(latent_shape_q), list(latent_shape_k), list(chunk_3d_shape_q), list(chunk_3d_shape_k),
        sparsity, cdf_threshold, max_blocks, backend,
    )


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    latent_shape_q: Shape,
    latent_shape_k: Shape,
    chunk_3d_shape_q: Shape = (4, 4, 8),
    chunk_3d_shape_k: Shape = (4, 4, 8),
    *,
    sm_scale: Optional[float] = None,
    backend: str = "auto",
    validate: bool = False,
    return_lse: bool = False,
):
    """Flash attention of every query block over its listed key blocks (SPEC §3).

    ``validate=True`` checks that ids lie in ``[0, Nk)``, counts in ``[0, Kmax]`` and ids
    are distinct (this synchronises the host); without it, out-of-range ids are skipped
    and a repeated id counts twice. Differentiable in q, k and v.
    """
    _validate.qkv(q, k, v)
    scale = _validate.sm_scale(sm_scale, q.shape[-1])
    geom_q, geom_k = _geometries(q, k, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k)
    if validate:
        _validate.block_lists(indices, counts, q, geom_q)
        _validate.check_block_values(indices, counts, geom_k.num_blocks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        _check_backward_supported(q, k, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k, backend)
    out, lse = torch.ops.bsa.forward(
        q, k, v, indices, counts, list(latent_shape_q), list(latent_shape_k),
        list(chunk_3d_shape_q), list(chunk_3d_shape_k), scale, backend,
    )
    return (out, lse) if return_lse else out


def _check_backward_supported(q, k, latent_q, latent_k, chunk_q, chunk_k, backend):
    """An explicit backend must also run the backward before the forward starts."""
    geom_q, geom_k = _geometries(q, k, latent_q, latent_k, chunk_q, chunk_k)
    try:
        resolve_backend(backend, "backward", q, geom_q, geom_k, {"q": q, "k": k})
    except BackendUnavailableError as exc:
        raise BackendUnavailableError(f"{exc} (inputs require grad; use backend='auto' or another backend)") from None


def flash_attn_bsa_3d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q: Shape,
    latent_shape_k: Shape,
    sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None,
    chunk_3d_shape_q: Shape = (4, 4, 8),
    chunk_3d_shape_k: Shape = (4, 4, 8),
    *,
    max_blocks: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block sparse attention, a drop-in for LongCat-Video's function of the same name.

    ``q [B, H, Sq, D]``, ``k, v [B, H, Sk, D]`` in THW raster order (any strides with a
    contiguous head dim); returns ``out [B, H, Sq, D]`` in q's dtype. Unlike upstream, the
    latent shapes need not divide into chunks and every query block keeps at least one
    key block (SPEC).
    """
    indices, counts = select_blocks(
        q, k, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k,
        sparsity, cdf_threshold, max_blocks=max_blocks, backend=backend,
    )
    return block_sparse_attention(
        q, k, v, indices, counts, latent_shape_q, latent_shape_k, chunk_3d_shape_q, chunk_3d_shape_k, backend=backend
    )
