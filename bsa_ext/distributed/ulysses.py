"""Ulysses (head-parallel) BSA with LongCat's ``cp_split_hw`` layout.

LongCat-Video shards a video latent ``(T, H, W)`` over ``cp = sh * sw`` ranks by tiles
(``context_parallel_util.split_tensor_in_cp_2d``): rank ``r`` holds the tile
``(rh, rw) = (r // sw, r % sw)``, i.e. rows ``[rh*H/sh, (rh+1)*H/sh)`` and columns
``[rw*W/sw, (rw+1)*W/sw)`` of every frame, in THW order inside the tile. Its
all-to-all (``ulysses_wrapper.all_to_all``: scatter heads, gather sequence) then gives
every rank ``H_heads / cp`` heads of the whole sequence as the *concatenation of the
ranks' tiles in rank order*, and the attention layer calls BSA with latent
``(cp*T, H/sh, W/sw)``. Call that the slab order.

Chunks of the slab order are the chunks of the single-GPU run (same token sets, other
block ids) exactly when no chunk straddles two tiles and edge chunks agree:

* ``T % t == 0`` when ``cp > 1`` (tiles are stacked along the time axis),
* ``(H/sh) % h == 0`` when ``sh > 1`` and ``(W/sw) % w == 0`` when ``sw > 1``.

Then BSA on the slab order with latent ``(cp*T, H/sh, W/sw)`` equals the single-GPU run
up to token order (selection scores are the same numbers; only exact score ties could
pick differently, as block ids differ). Otherwise ``ulysses_flash_attn_bsa_3d`` permutes
q, k, v to THW order, runs on the global latent and permutes the output back: one copy
of q, k, v and out, no change to the kernels. W720 ``(T, 44, 80)`` with chunk
``(4, 4, 4)`` meets the conditions for ``cp_split_hw`` (1, 2), (1, 4) but not (2, *):
44 / 2 = 22 rows is no multiple of 4.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..interface import flash_attn_bsa_3d
from ..layout import as_shape3

Shape = Sequence[int]


def _split(cp_split_hw: Shape) -> Tuple[int, int]:
    sh, sw = (int(x) for x in cp_split_hw)
    if sh < 1 or sw < 1:
        raise ValueError(f"cp_split_hw: expected two positive integers, got {tuple(cp_split_hw)!r}")
    return sh, sw


def _check_tiles(name: str, latent: Shape, cp_split_hw: Shape) -> Tuple[int, int, int, int, int]:
    T, H, W = as_shape3(latent)
    sh, sw = _split(cp_split_hw)
    if H % sh or W % sw:
        raise ValueError(f"{name}: H={H} and W={W} must be multiples of cp_split_hw={sh, sw} (LongCat splits tiles evenly)")
    return T, H, W, sh, sw


def ulysses_latent_shape(latent_shape: Shape, cp_split_hw: Shape) -> Tuple[int, int, int]:
    """The latent LongCat passes to BSA after the all-to-all: ``(cp*T, H/sh, W/sw)``."""
    T, H, W, sh, sw = _check_tiles("latent_shape", latent_shape, cp_split_hw)
    return sh * sw * T, H // sh, W // sw


def ulysses_partition_mismatch(latent_shape: Shape, chunk_3d_shape: Shape, cp_split_hw: Shape) -> List[str]:
    """Why the slab order's chunks differ from the single-GPU chunks (empty list: they match)."""
    T, H, W, sh, sw = _check_tiles("latent_shape", latent_shape, cp_split_hw)
    t, h, w = as_shape3(chunk_3d_shape)
    reasons = []
    if sh * sw > 1 and T % t:
        reasons.append(f"T={T} is not a multiple of the chunk's t={t}: chunks would straddle two tiles")
    if sh > 1 and (H // sh) % h:
        reasons.append(f"H/sh={H // sh} is not a multiple of the chunk's h={h}")
    if sw > 1 and (W // sw) % w:
        reasons.append(f"W/sw={W // sw} is not a multiple of the chunk's w={w}")
    return reasons


def ulysses_chunks_match(latent_shape: Shape, chunk_3d_shape: Shape, cp_split_hw: Shape) -> bool:
    return not ulysses_partition_mismatch(latent_shape, chunk_3d_shape, cp_split_hw)


def ulysses_token_order(latent_shape: Shape, cp_split_hw: Shape, device=None) -> torch.Tensor:
    """int64 ``[T*H*W]``: the THW token at each position of the slab order."""
    T, H, W, sh, sw = _check_tiles("latent_shape", latent_shape, cp_split_hw)
    th, tw = H // sh, W // sw
    p = torch.arange(T * H * W, device=device)
    rank, local = p // (T * th * tw), p % (T * th * tw)
    rh, rw = rank // sw, rank % sw
    tt, hh, ww = local // (th * tw), (local // tw) % th, local % tw
    return (tt * H + rh * th + hh) * W + rw * tw + ww


def thw_to_ulysses(x: torch.Tensor, latent_shape: Shape, cp_split_hw: Shape, dim: int = 2) -> torch.Tensor:
    """Reorder the sequence dim of ``x`` from THW order to the slab order (a copy)."""
    return x.index_select(dim, ulysses_token_order(latent_shape, cp_split_hw, x.device))


def ulysses_to_thw(x: torch.Tensor, latent_shape: Shape, cp_split_hw: Shape, dim: int = 2) -> torch.Tensor:
    """Reorder the sequence dim of ``x`` from the slab order back to THW order (a copy)."""
    order = ulysses_token_order(latent_shape, cp_split_hw, x.device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=x.device)
    return x.index_select(dim, inverse)


def tile_of_rank(x: torch.Tensor, latent_shape: Shape, cp_split_hw: Shape, rank: int, dim: int = 2) -> torch.Tensor:
    """Rank ``rank``'s tile of a THW-ordered sequence, as LongCat's ``split_cp_2d`` cuts it."""
    T, H, W, sh, sw = _check_tiles("latent_shape", latent_shape, cp_split_hw)
    rh, rw = rank // sw, rank % sw
    grid = x.unflatten(dim, (T, H, W))
    tile = grid.narrow(dim + 1, rh * (H // sh), H // sh).narrow(dim + 2, rw * (W // sw), W // sw)
    return tile.flatten(dim, dim + 2)


def ulysses_flash_attn_bsa_3d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q: Shape,
    latent_shape_k: Shape,
    cp_split_hw: Shape,
    sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None,
    chunk_3d_shape_q: Shape = (4, 4, 8),
    chunk_3d_shape_k: Shape = (4, 4, 8),
    *,
    max_blocks: Optional[int] = None,
    backend: str = "auto",
    force_permute: bool = False,
) -> torch.Tensor:
    """BSA on sequences in the slab order, equal to the single-GPU run on the THW order.

    ``latent_shape_q/k`` are the *global* latents ``(T, H, W)`` (not LongCat's
    ``(cp*T, H/sh, W/sw)``); q, k, v and the output are in the slab order. Runs in place
    when the chunk partitions match (see the module docstring), else through a THW copy.
    """
    match = not force_permute and ulysses_chunks_match(latent_shape_q, chunk_3d_shape_q, cp_split_hw) and (
        ulysses_chunks_match(latent_shape_k, chunk_3d_shape_k, cp_split_hw)
    )
    common = dict(max_blocks=max_blocks, backend=backend)
    if match:
        return flash_attn_bsa_3d(
            q, k, v, ulysses_latent_shape(latent_shape_q, cp_split_hw), ulysses_latent_shape(latent_shape_k, cp_split_hw),
            sparsity, cdf_threshold, chunk_3d_shape_q, chunk_3d_shape_k, **common,
        )
    qt = ulysses_to_thw(q, latent_shape_q, cp_split_hw)
    kt = ulysses_to_thw(k, latent_shape_k, cp_split_hw)
    vt = ulysses_to_thw(v, latent_shape_k, cp_split_hw)
    out = flash_attn_bsa_3d(qt, kt, vt, latent_shape_q, latent_shape_k, sparsity, cdf_threshold, chunk_3d_shape_q, chunk_3d_shape_k, **common)
    return thw_to_ulysses(out, latent_shape_q, cp_split_hw)


# ---------------------------------------------------------------- the all-to-all
def _heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, Hh, S_r, D]`` tiles -> ``[B, Hh/P, P*S_r, D]`` in rank order (LongCat's a2a in)."""
    world = dist.get_world_size(group)
    B, Hh, S, D = x.shape
    send = x.reshape(B, world, Hh // world, S, D).transpose(0, 1).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(B, Hh // world, world * S, D)


def _sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of ``_heads_to_sequence`` (LongCat's a2a out)."""
    world = dist.get_world_size(group)
    B, Hp, S, D = x.shape
    send = x.reshape(B, Hp, world, S // world, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.transpose(0, 1).reshape(B, world * Hp, S // world, D)


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_sequence(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _sequence_to_heads(grad, ctx.group), None


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _sequence_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_sequence(grad, ctx.group), None


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    latent_shape_q: Shape,
    latent_shape_k: Shape,
    cp_split_hw: Shape,
    sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None,
    chunk_3d_shape_q: Shape = (4, 4, 8),
    chunk_3d_shape_k: Shape = (4, 4, 8),
    *,
    group=None,
    **kwargs,
) -> torch.Tensor:
    """LongCat's Ulysses attention end to end: this rank's tiles ``[B, heads, S/cp, D]`` in,
    its tile of the output out; heads must divide by ``cp``. Differentiable."""
    world = dist.get_world_size(group)
    sh, sw = _split(cp_split_hw)
    if world != sh * sw:
        raise ValueError(f"cp_split_hw: {sh}*{sw} must equal the group's world size {world}")
    if q.shape[1] % world:
        raise ValueError(f"q: {q.shape[1]} heads do not divide over {world} ranks")
    qs, ks, vs = (_HeadsToSequence.apply(x, group) for x in (q, k, v))
    out = ulysses_flash_attn_bsa_3d(
        qs, ks, vs, latent_shape_q, latent_shape_k, cp_split_hw, sparsity, cdf_threshold, chunk_3d_shape_q, chunk_3d_shape_k,
        **kwargs,
    )
    return _SequenceToHeads.apply(out, group)
