"""Triton block selection (SPEC §2).

Pooling and block scores are Triton kernels reading q/k in place through the chunk
arithmetic; the ranking uses torch on the device (no host synchronisation):
* top-k: the scores kernel emits int64 keys ``(order-preserving score bits << 32) |
  (Nk - 1 - id)``, unique per row, so ``torch.topk`` picks the K best with ties going
  to the smaller id whatever its own tie rule;
* cdf (and cdf + top-k): a stable descending sort of the fp32 scores; the softmax of
  the sorted scores gives the sorted probabilities, whose running sum sets the count.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..layout import ChunkGeometry, selection_width, topk_count
from .forward import block_tokens, head_block, tile_mask

# Bounds the score matrix materialised at once (elements, summed over the heads of a slab).
_SCORES_PER_SLAB = 1 << 27


@triton.jit
def _pool_kernel(
    X, Pooled, sxb, sxh, sxs, n_heads, n_blocks,
    LT, LH, LW, NH, NW,
    CT: tl.constexpr, CH: tl.constexpr, CW: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    for r0 in tl.static_range(0, CT * CH * CW, BLOCK_R):
        tok, valid = block_tokens(blk, r0 + tl.arange(0, BLOCK_R), LT, LH, LW, NH, NW, CT, CH, CW)
        x = tl.load(X + b * sxb + h * sxh + tok.to(tl.int64)[:, None] * sxs + offs_d[None, :],
                    mask=tile_mask(valid, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    it = blk // (NH * NW)
    ih = (blk // NW) % NH
    iw = blk % NW
    n_valid = (tl.minimum(LT - it * CT, CT) * tl.minimum(LH - ih * CH, CH) * tl.minimum(LW - iw * CW, CW))
    out = Pooled + (bh.to(tl.int64) * n_blocks + blk) * HEAD_DIM + offs_d
    tl.store(out, acc / n_valid.to(tl.float32), mask=dmask)


@triton.jit
def _scores_kernel(
    QP, KP, Out, nq, nk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    RANK_KEYS: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = tl.arange(0, BLOCK_D)
    imask = offs_i < nq
    qp = tl.load(QP + (bh * nq + offs_i)[:, None] * HEAD_DIM + offs_d[None, :],
                 mask=tile_mask(imask, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    row = (bh * nq + offs_i).to(tl.int64) * nk
    for j0 in range(0, nk, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        jmask = offs_j < nk
        kp = tl.load(KP + (bh * nk + offs_j)[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=tile_mask(jmask, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
        s = tl.dot(qp, tl.trans(kp), input_precision="ieee")
        ptrs = Out + row[:, None] + offs_j[None, :]
        smask = imask[:, None] & jmask[None, :]
        if RANK_KEYS:
            # -0.0 and +0.0 are equal scores: give them one bit pattern before ranking.
            s = tl.where(s == 0.0, 0.0, s)
            bits = s.to(tl.int32, bitcast=True)
            ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
            key = ordered.to(tl.int64) * 4294967296 + (nk - 1 - offs_j).to(tl.int64)[None, :]
            tl.store(ptrs, key, mask=smask)
        else:
            tl.store(ptrs, s, mask=smask)


def pool(x: torch.Tensor, geom: ChunkGeometry) -> torch.Tensor:
    """Mean of the valid tokens of each block, fp32 accumulation: ``[B*H, N, D]`` fp32."""
    B, H, _, D = x.shape
    pooled = torch.empty((B * H, geom.num_blocks, D), device=x.device, dtype=torch.float32)
    T, LH, W, t, h, w, _, nh, nw = geom.as_ints()
    block_d = head_block(D)
    block_r = min(geom.capacity, max(16, 8192 // block_d))
    _pool_kernel[(geom.num_blocks, B * H)](
        x, pooled, x.stride(0), x.stride(1), x.stride(2), H, geom.num_blocks,
        T, LH, W, nh, nw, CT=t, CH=h, CW=w, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4,
    )
    return pooled


def _scores(qp: torch.Tensor, kp: torch.Tensor, rank_keys: bool) -> torch.Tensor:
    n, nq, D = qp.shape
    nk = kp.shape[1]
    out = torch.empty((n, nq, nk), device=qp.device, dtype=torch.int64 if rank_keys else torch.float32)
    block_d = head_block(D)
    block_i, block_j = 32, (32 if block_d > 128 else 64)
    _scores_kernel[(triton.cdiv(nq, block_i), n)](
        qp, kp, out, nq, nk, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_I=block_i, BLOCK_J=block_j,
        RANK_KEYS=rank_keys, num_warps=4,
    )
    return out


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    geom_q: ChunkGeometry,
    geom_k: ChunkGeometry,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    max_blocks: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC §2: ``indices int32 [B, H, Nq, Kmax]``, ``counts int32 [B, H, Nq]``.

    Within the first ``counts`` entries the ids are in descending score order, equal
    scores in ascending id order. Entries past ``counts`` hold the next-ranked ids.
    """
    if sparsity is None and cdf_threshold is None:
        raise ValueError("select_blocks: give sparsity, cdf_threshold or both")
    B, H = q.shape[:2]
    qp, kp = pool(q, geom_q), pool(k, geom_k)
    return select_pooled(qp.view(B, H, *qp.shape[1:]), kp.view(B, H, *kp.shape[1:]), sparsity, cdf_threshold, max_blocks)


def select_pooled(
    q_pooled: torch.Tensor,
    k_pooled: torch.Tensor,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
    max_blocks: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``select_blocks`` from pooled blocks (fp32 ``[B, H, N, D]``), same order of entries."""
    if sparsity is None and cdf_threshold is None:
        raise ValueError("select_pooled: give sparsity, cdf_threshold or both")
    B, H, nq, D = q_pooled.shape
    nk = k_pooled.shape[2]
    width = selection_width(nk, sparsity, cdf_threshold, max_blocks)
    qp = q_pooled.float().reshape(B * H, nq, D).contiguous()
    kp = k_pooled.float().reshape(B * H, nk, D).contiguous()
    indices = torch.empty((B * H, nq, width), device=qp.device, dtype=torch.int32)
    counts = torch.empty((B * H, nq), device=qp.device, dtype=torch.int32)
    slab = max(1, _SCORES_PER_SLAB // max(1, nq * nk))
    for bh0 in range(0, B * H, slab):
        bh1 = min(B * H, bh0 + slab)
        if cdf_threshold is None:
            keys = _scores(qp[bh0:bh1], kp[bh0:bh1], rank_keys=True)
            best = torch.topk(keys, width, dim=-1, largest=True, sorted=True).values
            indices[bh0:bh1] = (nk - 1) - torch.bitwise_and(best, 0xFFFFFFFF)
            counts[bh0:bh1] = width
        else:
            scores = _scores(qp[bh0:bh1], kp[bh0:bh1], rank_keys=False)
            ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            del scores
            # softmax is order-free, so the sorted scores give the sorted probabilities.
            cumulative = torch.softmax(ranked * D**-0.5, dim=-1).cumsum(-1)
            n = (cumulative < cdf_threshold).sum(-1) + 1
            n = n.clamp(max=nk)
            if sparsity is not None:
                n = n.clamp(min=topk_count(nk, sparsity))
            counts[bh0:bh1] = n.clamp(max=width)
            indices[bh0:bh1] = order[..., :width]
    return indices.view(B, H, nq, width), counts.view(B, H, nq)
