"""The PyTorch reference: the definition of truth for SPEC §2-3.

Everything is computed in float64 on whatever device the inputs live on. The
attention reference gathers, for each query block, the key tokens of its selected
blocks (so its cost follows the sparse FLOPs, and it also serves as the ``torch``
backend); ``python_tests/test_reference.py`` checks it against dense attention with
an explicit token mask, an independent formulation.

SPEC §2 states pooling and scores in fp32; the reference ranks with fp64 scores, which
can differ from fp32 kernels only on near-ties (in the last fp32 bits) and on cdf sums
within rounding of the threshold: kernel tests compare index sets with that allowance.

Conventions shared with every backend:
* ids outside ``[0, Nk)`` within ``counts`` are skipped; a block listed twice counts
  twice (``validate=True`` in the Python API reports both);
* a query block with no key block gives ``out = 0`` and ``lse = -inf``.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .layout import ChunkGeometry, selection_width, topk_count

# Rows of (query block x gathered keys) handled per slab, bounding peak memory.
_SLAB_ELEMENTS = 1 << 25


def pool_blocks(x: torch.Tensor, geom: ChunkGeometry) -> torch.Tensor:
    """Mean of the valid tokens of each block: ``[B, H, S, D] -> [B, H, N, D]`` float64."""
    block = geom.block_of_token(x.device)
    out = x.new_zeros((*x.shape[:2], geom.num_blocks, x.shape[-1]), dtype=torch.float64)
    out.index_add_(2, block, x.double())
    return out / geom.valid_counts(x.device).to(torch.float64)[:, None]


def block_scores(q: torch.Tensor, k: torch.Tensor, geom_q: ChunkGeometry, geom_k: ChunkGeometry) -> torch.Tensor:
    """``s[b, h, i, j] = q_cmp[i] . k_cmp[j]`` in float64, ``[B, H, Nq, Nk]``."""
    return pool_blocks(q, geom_q) @ pool_blocks(k, geom_k).transpose(-1, -2)


def cdf_counts(scores: torch.Tensor, cdf_threshold: float, head_dim: int) -> torch.Tensor:
    """Smallest n >= 1 whose n largest softmax probabilities sum to >= threshold."""
    p = torch.softmax(scores * head_dim**-0.5, dim=-1)
    cum = torch.sort(p, dim=-1, descending=True).values.cumsum(-1)
    n = (cum < cdf_threshold).sum(-1) + 1
    return n.clamp(max=scores.shape[-1])


def select_from_scores(
    scores: torch.Tensor,
    head_dim: int,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    max_blocks: Optional[int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (best first, ties to the smaller id) and counts from block scores."""
    nk = scores.shape[-1]
    width = selection_width(nk, sparsity, cdf_threshold, max_blocks)
    # A stable descending sort keeps equal scores in id order: ties go to the smaller id.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    if cdf_threshold is None:
        counts = torch.full(scores.shape[:-1], topk_count(nk, sparsity), device=scores.device, dtype=torch.int64)
    else:
        counts = cdf_counts(scores, cdf_threshold, head_dim)
        if sparsity is not None:
            counts = counts.clamp(min=topk_count(nk, sparsity))
    counts = counts.clamp(max=width)
    return order[..., :width].to(torch.int32).contiguous(), counts.to(torch.int32)


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    geom_q: ChunkGeometry,
    geom_k: ChunkGeometry,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    max_blocks: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC §2: ``indices int32 [B, H, Nq, Kmax]``, ``counts int32 [B, H, Nq]``."""
    scores = block_scores(q, k, geom_q, geom_k)
    return select_from_scores(scores, q.shape[-1], sparsity, cdf_threshold, max_blocks)


def _gathered_keys(indices, counts, geom_k: ChunkGeometry, device):
    """For each (.., query block): key token ids ``[..., Kmax*cap_k]`` (-1 where masked)."""
    tok = geom_k.token_index(device)  # [Nk, cap_k]
    kmax = indices.shape[-1]
    ids = indices.long()
    live = (torch.arange(kmax, device=device) < counts.long()[..., None]) & (ids >= 0) & (ids < geom_k.num_blocks)
    keys = tok[ids.clamp(0, geom_k.num_blocks - 1)]  # [..., Kmax, cap_k]
    keys = torch.where(live[..., None], keys, torch.full_like(keys, -1))
    return keys.flatten(-2)


def _slabs(nq: int, rows_per_block: int, keys_per_block: int):
    step = max(1, _SLAB_ELEMENTS // max(1, rows_per_block * keys_per_block))
    for start in range(0, nq, step):
        yield start, min(nq, start + step)


def _gather_rows(x: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
    """``x [S, D]`` rows at ``tok`` (any shape, -1 -> zero row), float64."""
    xd = torch.cat([x.double(), x.new_zeros((1, x.shape[-1]), dtype=torch.float64)])
    return xd[torch.where(tok >= 0, tok, torch.full_like(tok, x.shape[0]))]


def _slab_softmax(qs, ks, kt, scale):
    """Unnormalised probabilities of a slab: ``p [n, cq, L]``, row max ``m`` and sum ``l``.

    Masked keys (``kt < 0``) get probability 0; a row with no live key keeps ``l = 0``.
    """
    s = (qs @ ks.transpose(-1, -2)) * scale
    s = s.masked_fill((kt < 0)[:, None, :], -math.inf)
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    return p, m, p.sum(-1, keepdim=True)


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    geom_q: ChunkGeometry,
    geom_k: ChunkGeometry,
    sm_scale: Optional[float] = None,
    query_blocks: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC §3 forward in float64: ``out [B, H, Sq, D]`` (float64), ``lse [B, H, Sq]`` (float64).

    ``query_blocks`` (int64 ids) restricts the work to those blocks, for spot checks of
    large problems; rows of other blocks are left at 0 / -inf.
    """
    B, H, Sq, D = q.shape
    scale = D**-0.5 if sm_scale is None else sm_scale
    out = q.new_zeros((B, H, Sq, D), dtype=torch.float64)
    lse = q.new_full((B, H, Sq), -math.inf, dtype=torch.float64)
    qtok = geom_q.token_index(q.device)  # [Nq, cap_q]
    for b in range(B):
        for h in range(H):
            keys = _gathered_keys(indices[b, h], counts[b, h], geom_k, q.device)  # [Nq, L]
            blocks = torch.arange(geom_q.num_blocks, device=q.device) if query_blocks is None else query_blocks.to(q.device)
            for s0, s1 in _slabs(len(blocks), geom_q.capacity, keys.shape[-1]):
                rows, kt = qtok[blocks[s0:s1]], keys[blocks[s0:s1]]
                qs = _gather_rows(q[b, h], rows)  # [n, cq, D]
                ks = _gather_rows(k[b, h], kt)  # [n, L, D]
                vs = _gather_rows(v[b, h], kt)
                p, m, l = _slab_softmax(qs, ks, kt, scale)
                o = (p @ vs) / torch.where(l > 0, l, torch.ones_like(l))
                row_lse = torch.where(l > 0, m + torch.log(l), torch.full_like(l, -math.inf)).squeeze(-1)
                valid = rows >= 0
                out[b, h, rows[valid]] = o[valid]
                lse[b, h, rows[valid]] = row_lse[valid]
    return out, lse


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    geom_q: ChunkGeometry,
    geom_k: ChunkGeometry,
    sm_scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC §3 backward in float64 (recomputes the forward): ``dq, dk, dv`` float64."""
    B, H, Sq, D = q.shape
    scale = D**-0.5 if sm_scale is None else sm_scale
    dq = q.new_zeros(q.shape, dtype=torch.float64)
    dk = k.new_zeros(k.shape, dtype=torch.float64)
    dv = v.new_zeros(v.shape, dtype=torch.float64)
    qtok = geom_q.token_index(q.device)
    sink = k.shape[2]  # padding keys scatter into a discarded extra row
    for b in range(B):
        for h in range(H):
            keys = _gathered_keys(indices[b, h], counts[b, h], geom_k, q.device)
            dk_acc = k.new_zeros((sink + 1, D), dtype=torch.float64)
            dv_acc = k.new_zeros((sink + 1, D), dtype=torch.float64)
            for s0, s1 in _slabs(geom_q.num_blocks, geom_q.capacity, keys.shape[-1]):
                rows, kt = qtok[s0:s1], keys[s0:s1]
                qs, dos = _gather_rows(q[b, h], rows), _gather_rows(dout[b, h], rows)
                ks, vs = _gather_rows(k[b, h], kt), _gather_rows(v[b, h], kt)
                p, _, l = _slab_softmax(qs, ks, kt, scale)
                p = p / torch.where(l > 0, l, torch.ones_like(l))
                dp = dos @ vs.transpose(-1, -2)
                ds = p * (dp - (p * dp).sum(-1, keepdim=True))
                valid = rows >= 0
                dq[b, h, rows[valid]] = (scale * ds @ ks)[valid]
                target = torch.where(kt >= 0, kt, torch.full_like(kt, sink)).flatten()
                # Padding query rows are zero in qs/dos, so they add nothing here.
                dk_acc.index_add_(0, target, (scale * ds.transpose(-1, -2) @ qs).flatten(0, 1))
                dv_acc.index_add_(0, target, (p.transpose(-1, -2) @ dos).flatten(0, 1))
            dk[b, h] = dk_acc[:sink]
            dv[b, h] = dv_acc[:sink]
    return dq, dk, dv


def dense_block_mask(indices, counts, geom_q: ChunkGeometry, geom_k: ChunkGeometry) -> torch.Tensor:
    """Token-level boolean mask ``[B, H, Sq, Sk]`` of the selected blocks (small shapes only)."""
    B, H, nq, kmax = indices.shape
    nk = geom_k.num_blocks
    ids = indices.long()
    live = (torch.arange(kmax, device=ids.device) < counts.long()[..., None]) & (ids >= 0) & (ids < nk)
    blocks = torch.zeros((B, H, nq, nk + 1), dtype=torch.bool, device=ids.device)
    blocks.scatter_(-1, torch.where(live, ids, torch.full_like(ids, nk)), True)
    blocks = blocks[..., :nk]
    bq = geom_q.block_of_token(ids.device)
    bk = geom_k.block_of_token(ids.device)
    return blocks[:, :, bq][:, :, :, bk]
