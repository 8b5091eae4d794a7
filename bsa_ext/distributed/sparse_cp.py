"""Sparse context-parallel BSA: every rank keeps a shard of the sequence and fetches only
the key/value chunks that its query chunks selected.

Sharding: a sequence in THW order is cut into whole *time rows of chunks* (all
``Nh*Nw`` chunks of a chunk-row ``it``), one contiguous range of rows per rank, uneven
allowed (``ChunkShards``). A shard is itself a THW sequence with latent
``(frames, H, W)`` whose blocks are the global blocks ``[b0, b1)`` in order, so every
local op runs on it unchanged. q and k/v are sharded independently (``Sq != Sk``,
different chunk shapes).

Forward (``sparse_cp_flash_attn_bsa_3d``):

1. pool the local keys; ``all_gather`` the pooled keys (``[B, H, Nk_r, D]``: tiny);
2. score the local query blocks against all key blocks and select (SPEC §2) on the
   requested backend (``torch.ops.bsa.cuda_select_pooled`` for CUDA);
3. ``all_to_all_single`` of request masks ``[B, H, Nk_o]`` (uint8) to every owner ``o``;
4. owners pack the requested (batch, head, chunk) K/V rows; ``all_to_all_single`` with
   uneven splits sends them (one host sync for the split sizes);
5. with ``overlap=True`` (default for fp16/bf16) the attention over the blocks this rank
   owns runs while the fetch is in flight, then the attention over the fetched blocks,
   and the two partial results merge by their LSE; with ``overlap=False`` (default for
   fp32/fp64, where the fp32 LSE of the merge would cost precision) one call covers all
   blocks after the fetch, exactly the single-GPU computation.

The fetched chunks land at their own token positions in a zero-filled K/V buffer of the
global key length, so the kernels run on the global key geometry with the global block
ids: no index remapping, partial edge chunks stay masked. The buffer is transient
(built in forward and again in backward); only the fetched rows are kept for backward.

Backward: one attention-backward call over all selected blocks with the merged
``out``/``lse``; dK/dV of fetched chunks go back to their owners through the reverse
``all_to_all_single`` and are added in fp32 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..layout import ChunkGeometry, as_shape3

Shape = Sequence[int]

# Fill of the K/V buffer where no chunk was fetched. None leaves it unwritten (the kernels read
# only fetched and own chunks); the tests set NaN to prove that nothing else is read.
_BUFFER_FILL: Optional[float] = None


# ---------------------------------------------------------------- sharding
@dataclass(frozen=True)
class ChunkShards:
    """A THW sequence split over ranks by whole time rows of chunks.

    ``rows[r]:rows[r+1]`` are the chunk-rows (``it``) of rank ``r``.
    """

    geom: ChunkGeometry
    rows: Tuple[int, ...]

    @classmethod
    def split(cls, latent: Shape, chunk: Shape, world_size: int, rows_per_rank: Optional[Sequence[int]] = None) -> "ChunkShards":
        """Even split (the first ranks get the extra rows) or explicit ``rows_per_rank``."""
        geom = ChunkGeometry(as_shape3(latent), as_shape3(chunk))
        nt = geom.grid[0]
        if rows_per_rank is None:
            if world_size > nt:
                raise ValueError(f"world_size: {world_size} ranks but only {nt} chunk rows (T={geom.latent[0]}, t={geom.chunk[0]})")
            rows_per_rank = [nt // world_size + (r < nt % world_size) for r in range(world_size)]
        rows_per_rank = [int(n) for n in rows_per_rank]
        if len(rows_per_rank) != world_size or sum(rows_per_rank) != nt or min(rows_per_rank) < 1:
            raise ValueError(f"rows_per_rank: expected {world_size} positive counts summing to {nt} chunk rows, got {rows_per_rank}")
        bounds = [0]
        for n in rows_per_rank:
            bounds.append(bounds[-1] + n)
        return cls(geom, tuple(bounds))

    @property
    def world_size(self) -> int:
        return len(self.rows) - 1

    @property
    def blocks_per_row(self) -> int:
        _, nh, nw = self.geom.grid
        return nh * nw

    def block_range(self, rank: int) -> Tuple[int, int]:
        return self.rows[rank] * self.blocks_per_row, self.rows[rank + 1] * self.blocks_per_row

    def frame_range(self, rank: int) -> Tuple[int, int]:
        t, T = self.geom.chunk[0], self.geom.latent[0]
        return self.rows[rank] * t, min(self.rows[rank + 1] * t, T)

    def token_range(self, rank: int) -> Tuple[int, int]:
        _, H, W = self.geom.latent
        f0, f1 = self.frame_range(rank)
        return f0 * H * W, f1 * H * W

    def local_latent(self, rank: int) -> Tuple[int, int, int]:
        f0, f1 = self.frame_range(rank)
        return f1 - f0, self.geom.latent[1], self.geom.latent[2]

    def local_geometry(self, rank: int) -> ChunkGeometry:
        return ChunkGeometry(self.local_latent(rank), self.geom.chunk)

    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s part of a full THW sequence (a view)."""
        s0, s1 = self.token_range(rank)
        return x.narrow(dim, s0, s1 - s0)


# ---------------------------------------------------------------- small collectives
def _world(group) -> Tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_to_all(out, inp, out_splits, in_splits, group, async_op=False):
    """``all_to_all_single`` (torch's), a plain copy in a one-rank world."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        out.copy_(inp.reshape(out.shape))
        return None
    return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _add(stats: Optional[Dict[str, int]], key: str, value: int) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + int(value)


# ---------------------------------------------------------------- selection
def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    # fp32 as in SPEC §2 on GPU; fp64 on CPU, as the torch backend's reference does.
    return torch.float64 if (x.dtype == torch.float64 or x.device.type == "cpu") else torch.float32


def pool_local(x: torch.Tensor, geom: ChunkGeometry) -> torch.Tensor:
    """Mean of the valid tokens of each block, ``[B, H, S, D] -> [B, H, N, D]``, without an upcast copy."""
    T, H, W = geom.latent
    t, h, w = geom.chunk
    nt, nh, nw = geom.grid
    grid = x.unflatten(2, (T, H, W))
    if not geom.divisible:
        # Zero padding adds nothing to the sums; the mean divides by valid counts.
        grid = F.pad(grid, (0, 0, 0, nw * w - W, 0, nh * h - H, 0, nt * t - T))
    blocks = grid.unflatten(2, (nt, t)).unflatten(4, (nh, h)).unflatten(6, (nw, w))
    acc = _accumulate_dtype(x)
    sums = blocks.sum(dim=(3, 5, 7), dtype=acc).flatten(2, 4)
    return sums / geom.valid_counts(x.device).to(acc)[:, None]


def sparse_cp_select(
    q: torch.Tensor,
    k: torch.Tensor,
    shards_q: ChunkShards,
    shards_k: ChunkShards,
    sparsity: Optional[float] = 0.875,
    cdf_threshold: Optional[float] = None,
    max_blocks: Optional[int] = None,
    *,
    backend: str = "auto",
    group=None,
    stats: Optional[Dict[str, int]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """SPEC §2 selection of this rank's query blocks against all key blocks.

    Returns ``indices int32 [B, H, Nq_r, Kmax]`` holding *global* key block ids and
    ``counts int32 [B, H, Nq_r]``. Only the pooled keys travel (``all_gather``). The
    pooling runs in torch; the scores and the choice run on ``backend``, resolved as
    ``select_blocks`` resolves it for q.
    """
    from .. import _validate, ops

    _validate.selection_params(sparsity, cdf_threshold, max_blocks)
    rank, world = _world(group)
    _check_shard("q", q, shards_q, rank, world)
    _check_shard("k", k, shards_k, rank, world)
    k_cmp = pool_local(k, shards_k.local_geometry(rank))
    widest = max(shards_k.block_range(r)[1] - shards_k.block_range(r)[0] for r in range(world))
    if world > 1:
        # all_gather needs equal sizes: pad every rank's pooled keys to the widest shard.
        padded = F.pad(k_cmp, (0, 0, 0, widest - k_cmp.shape[2])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        work = dist.all_gather(parts, padded, group=group, async_op=True)
        q_cmp = pool_local(q, shards_q.local_geometry(rank))
        work.wait()
        spans = [shards_k.block_range(r) for r in range(world)]
        k_cmp = torch.cat([p[:, :, : b1 - b0] for p, (b0, b1) in zip(parts, spans)], dim=2)
        _add(stats, "pooled_keys", (world - 1) * _nbytes(padded))
    else:
        q_cmp = pool_local(q, shards_q.local_geometry(rank))
    geom_q = shards_q.local_geometry(rank)
    return ops.select_pooled(q_cmp, k_cmp, q, geom_q, shards_k.geom, sparsity, cdf_threshold, max_blocks, backend)


def _check_shard(name: str, x: torch.Tensor, shards: ChunkShards, rank: int, world: int) -> None:
    if shards.world_size != world:
        raise ValueError(f"shards of {name}: built for {shards.world_size} ranks, the group has {world}")
    s0, s1 = shards.token_range(rank)
    if x.dim() != 4 or x.shape[2] != s1 - s0:
        raise ValueError(
            f"{name}: rank {rank} holds frames {shards.frame_range(rank)} of latent {shards.geom.latent}, "
            f"expected [B, H, {s1 - s0}, D], got {tuple(x.shape)}"
        )


# ---------------------------------------------------------------- the fetch plan
@dataclass
class _Plan:
    """Which token rows travel between this rank and each peer.

    Rows go chunk by chunk in row-major (peer, batch, head, chunk) order, valid rows only,
    so sender and receiver derive the same order from the same request masks.
    """

    recv_rows: List[int]  # rows this rank receives from each owner
    send_rows: List[int]  # rows this rank sends to each requester
    recv_at: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (b, h, global token) of each received row
    send_at: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (b, h, local token) of each sent row


def _valid_rows(geom: ChunkGeometry, b, h, j):
    """(b, h, token) of the valid rows of chunks (b, h, j), chunk by chunk."""
    tok = geom.token_index(b.device)[j]
    valid = tok >= 0
    cap = tok.shape[-1]
    return b[:, None].expand(-1, cap)[valid], h[:, None].expand(-1, cap)[valid], tok[valid]


def _plan(indices, counts, shards_k: ChunkShards, rank, world, group, stats) -> _Plan:
    B, H, _, kmax = indices.shape
    geom = shards_k.geom
    nk = geom.num_blocks
    device = indices.device
    ids = indices.long()
    live = (torch.arange(kmax, device=device) < counts.long()[..., None]) & (ids >= 0) & (ids < nk)
    need = torch.zeros((B, H, nk + 1), dtype=torch.uint8, device=device)
    need.scatter_(-1, torch.where(live, ids, torch.full_like(ids, nk)).flatten(-2), 1)
    need = need[..., :nk]
    b0, b1 = shards_k.block_range(rank)
    need[..., b0:b1] = 0  # own blocks are never fetched
    spans = [shards_k.block_range(r) for r in range(world)]
    send = torch.cat([need[..., s0:s1].flatten() for s0, s1 in spans])
    requests = torch.empty((world * B * H * (b1 - b0),), dtype=torch.uint8, device=device)
    _all_to_all(requests, send, [B * H * (b1 - b0)] * world, [B * H * (s1 - s0) for s0, s1 in spans], group)
    requests = requests.view(world, B, H, b1 - b0)
    _add(stats, "requests", (world - 1) * B * H * (b1 - b0))
    # Received chunks: owner by owner, row-major (b, h, j) inside each owner's block range.
    recv = torch.cat([need[..., s0:s1].nonzero() + torch.tensor([0, 0, s0], device=device) for s0, s1 in spans])
    sent = requests.nonzero()  # (requester, b, h, local j)
    valid = geom.valid_counts(device)
    owner = torch.repeat_interleave(torch.arange(world, device=device), torch.tensor([e - s for s, e in spans], device=device))
    rows_in = torch.zeros(world, dtype=torch.long, device=device).index_add_(0, owner[recv[:, 2]], valid[recv[:, 2]])
    rows_out = torch.zeros(world, dtype=torch.long, device=device).index_add_(0, sent[:, 0], valid[sent[:, 3] + b0])
    splits = torch.cat([rows_in, rows_out]).tolist()  # host sync: all_to_all_single takes split sizes as ints
    return _Plan(
        splits[:world],
        splits[world:],
        _valid_rows(geom, recv[:, 0], recv[:, 1], recv[:, 2]),
        _valid_rows(shards_k.local_geometry(rank), sent[:, 1], sent[:, 2], sent[:, 3]),
    )


def _flat_rows(x: torch.Tensor, at) -> torch.Tensor:
    """Row numbers of the (b, h, token) triple ``at`` in ``x.view(-1, D)`` (x contiguous)."""
    b, h, t = at
    return (b * x.shape[1] + h) * x.shape[2] + t


def _gather_rows(x: torch.Tensor, at) -> torch.Tensor:
    # One index_select over flat rows: several times faster than three-tensor advanced indexing.
    if x.is_contiguous():
        return x.view(-1, x.shape[-1]).index_select(0, _flat_rows(x, at))
    return x[at]


def _pack(k, v, at) -> torch.Tensor:
    """``[rows, 2, D]``: the K and V rows at ``at`` (a (b, h, token) triple)."""
    return torch.stack([_gather_rows(k, at), _gather_rows(v, at)], dim=1)


def _buffers(k, v, shards_k: ChunkShards, rank, plan: _Plan, kv_recv, own: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global-length K/V holding the fetched chunks (and this rank's shard if ``own``) at their positions."""
    B, H, _, D = k.shape
    shape = (B, H, shards_k.geom.seq_len, D)
    if _BUFFER_FILL is None:
        kbuf = torch.empty(shape, dtype=k.dtype, device=k.device)
        vbuf = torch.empty(shape, dtype=v.dtype, device=v.device)
    else:
        kbuf = torch.full(shape, _BUFFER_FILL, dtype=k.dtype, device=k.device)
        vbuf = torch.full(shape, _BUFFER_FILL, dtype=v.dtype, device=v.device)
    if own:
        s0, s1 = shards_k.token_range(rank)
        kbuf[:, :, s0:s1] = k
        vbuf[:, :, s0:s1] = v
    rows = _flat_rows(kbuf, plan.recv_at)
    kbuf.view(-1, D).index_copy_(0, rows, kv_recv[:, 0])
    vbuf.view(-1, D).index_copy_(0, rows, kv_recv[:, 1])
    return kbuf, vbuf


def _split_lists(indices, counts, lo: int, hi: int):
    """(own, remote) block lists: entries inside ``[lo, hi)`` as local ids, the others as global ids."""
    kmax = indices.shape[-1]
    live = torch.arange(kmax, device=indices.device) < counts[..., None]
    own = (indices >= lo) & (indices < hi) & live
    remote = ~own & live
    out = []
    for mask, shift in ((own, lo), (remote, 0)):
        # Kept entries move to the front in their original order (a prefix count gives each its
        # slot; the others all land in a spare last column that is dropped). No sort needed.
        slot = torch.where(mask, torch.cumsum(mask, dim=-1) - 1, kmax)
        ids = torch.full((*indices.shape[:-1], kmax + 1), -1, dtype=torch.int32, device=indices.device)
        ids.scatter_(-1, slot, (indices - shift).to(torch.int32))
        out.append((ids[..., :kmax].contiguous(), mask.sum(-1).to(torch.int32)))
    return out


def _merge(out1, lse1, out2, lse2, backend: str):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp.

    ``backend`` is the one that ran the two attentions: "cuda" merges in one kernel
    (``torch.ops.bsa.cuda_merge``), the others in torch.
    """
    if backend == "cuda":
        return torch.ops.bsa.cuda_merge(out1.contiguous(), lse1.contiguous(), out2.contiguous(), lse2.contiguous())
    lse = torch.logaddexp(lse1, lse2)
    base = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(lse1 - base)[..., None]
    w2 = torch.exp(lse2 - base)[..., None]
    acc = torch.promote_types(out1.dtype, torch.float32)
    out = (out1.to(acc) * w1.to(acc) + out2.to(acc) * w2.to(acc)).to(out1.dtype)
    return out, lse


# ---------------------------------------------------------------- attention
class _SparseCPAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, indices, counts, shards_q, shards_k, sm_scale, backend, overlap, group, stats):
        from .. import ops

        rank, world = _world(group)
        geom_k = shards_k.geom
        # Resolved once: both attention calls and the merge run on the same backend.
        backend = ops.resolve_backend(backend, "forward", q, shards_q.local_geometry(rank), geom_k)
        plan = _plan(indices, counts, shards_k, rank, world, group, stats)
        send = _pack(k, v, plan.send_at)
        kv_recv = send.new_empty((sum(plan.recv_rows), 2, k.shape[-1]))
        work = _all_to_all(kv_recv, send, plan.recv_rows, plan.send_rows, group, async_op=overlap)
        _add(stats, "kv", _nbytes(kv_recv))
        latent_q = list(shards_q.local_latent(rank))
        chunk_q, chunk_k = list(shards_q.geom.chunk), list(geom_k.chunk)
        if overlap:
            (own_ids, own_n), (far_ids, far_n) = _split_lists(indices, counts, *shards_k.block_range(rank))
            # The blocks this rank owns need no data from others: compute them while the fetch runs.
            out1, lse1 = torch.ops.bsa.forward(
                q, k, v, own_ids, own_n, latent_q, list(shards_k.local_latent(rank)), chunk_q, chunk_k, sm_scale, backend
            )
            if work is not None:
                work.wait()
            kbuf, vbuf = _buffers(k, v, shards_k, rank, plan, kv_recv, own=False)
            out2, lse2 = torch.ops.bsa.forward(
                q, kbuf, vbuf, far_ids, far_n, latent_q, list(geom_k.latent), chunk_q, chunk_k, sm_scale, backend
            )
            out, lse = _merge(out1, lse1, out2, lse2, backend)
        else:
            kbuf, vbuf = _buffers(k, v, shards_k, rank, plan, kv_recv)
            out, lse = torch.ops.bsa.forward(
                q, kbuf, vbuf, indices, counts, latent_q, list(geom_k.latent), chunk_q, chunk_k, sm_scale, backend
            )
        del kbuf, vbuf
        ctx.save_for_backward(q, k, v, out, lse, indices, counts, kv_recv)
        ctx.plan, ctx.shards, ctx.sm_scale, ctx.backend, ctx.group, ctx.stats = plan, (shards_q, shards_k), sm_scale, backend, group, stats
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, indices, counts, kv_recv = ctx.saved_tensors
        plan, (shards_q, shards_k), group = ctx.plan, ctx.shards, ctx.group
        rank, _ = _world(group)
        geom_k = shards_k.geom
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        kbuf, vbuf = _buffers(k, v, shards_k, rank, plan, kv_recv)
        dq, dkbuf, dvbuf = torch.ops.bsa.backward(
            grad_out, q, kbuf, vbuf, out, lse, indices, counts, list(shards_q.local_latent(rank)), list(geom_k.latent),
            list(shards_q.geom.chunk), list(geom_k.chunk), ctx.sm_scale, ctx.backend,
        )
        del kbuf, vbuf
        # Gradients of fetched chunks go home through the reverse all-to-all.
        back = _pack(dkbuf, dvbuf, plan.recv_at)
        grads = back.new_empty((sum(plan.send_rows), *back.shape[1:]))
        _all_to_all(grads, back, plan.send_rows, plan.recv_rows, group)
        _add(ctx.stats, "grad_kv", _nbytes(grads))
        s0, s1 = shards_k.token_range(rank)
        acc = torch.promote_types(k.dtype, torch.float32)
        dk = dkbuf[:, :, s0:s1].to(acc)
        dv = dvbuf[:, :, s0:s1].to(acc)
        # Several requesters may return gradients for one chunk: accumulate.
        dk.index_put_(plan.send_at, grads[:, 0].to(acc), accumulate=True)
        dv.index_put_(plan.send_at, grads[:, 1].to(acc), accumulate=True)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None, None


def sparse_cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    shards_q: ChunkShards,
    shards_k: ChunkShards,
    *,
    sm_scale: Optional[float] = None,
    backend: str = "auto",
    overlap: Optional[bool] = None,
    group=None,
    stats: Optional[Dict[str, int]] = None,
    return_lse: bool = False,
):
    """Attention of this rank's query shard over the globally numbered key blocks in
    ``indices`` (as ``sparse_cp_select`` returns them), fetching only those blocks.
    Differentiable in q, k and v (this rank's shards). ``stats`` collects the bytes this
    rank received, by phase."""
    from .. import _validate

    rank, world = _world(group)
    _check_shard("q", q, shards_q, rank, world)
    _check_shard("k", k, shards_k, rank, world)
    _validate.qkv(q, k, v)
    if overlap is None:
        # The merge goes through fp32 LSEs (abs. error ~ulp(lse)): below half-precision
        # resolution, visible in fp32/fp64 outputs at large logits.
        overlap = q.dtype in (torch.float16, torch.bfloat16)
    scale = _validate.sm_scale(sm_scale, q.shape[-1])
    _validate.block_lists(indices, counts, q, shards_q.local_geometry(rank))
    out, lse = _SparseCPAttention.apply(q, k, v, indices, counts, shards_q, shards_k, scale, backend, overlap, group, stats)
    return (out, lse) if return_lse else out


def sparse_cp_flash_attn_bsa_3d(
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
    rows_q: Optional[Sequence[int]] = None,
    rows_k: Optional[Sequence[int]] = None,
    max_blocks: Optional[int] = None,
    backend: str = "auto",
    overlap: Optional[bool] = None,
    group=None,
    stats: Optional[Dict[str, int]] = None,
    return_lse: bool = False,
):
    """``flash_attn_bsa_3d`` over a sequence sharded by chunk-rows (see ``ChunkShards``).

    q, k, v are this rank's shards; ``latent_shape_q/k`` are the *global* latents;
    ``rows_q/k`` give each rank's number of chunk-rows (default: even). Returns this
    rank's shard of the output, equal to the same shard of the single-GPU result.
    """
    _, world = _world(group)
    shards_q = ChunkShards.split(latent_shape_q, chunk_3d_shape_q, world, rows_q)
    shards_k = ChunkShards.split(latent_shape_k, chunk_3d_shape_k, world, rows_k)
    indices, counts = sparse_cp_select(
        q, k, shards_q, shards_k, sparsity, cdf_threshold, max_blocks, backend=backend, group=group, stats=stats
    )
    return sparse_cp_attention(
        q, k, v, indices, counts, shards_q, shards_k, backend=backend, overlap=overlap, group=group, stats=stats,
        return_lse=return_lse,
    )


def dense_ring_bytes(shards_k: ChunkShards, rank: int, batch: int, heads: int, head_dim: int, element_size: int) -> int:
    """What a dense ring attention brings to ``rank`` in the forward: every K and V token it does not own."""
    s0, s1 = shards_k.token_range(rank)
    return 2 * (shards_k.geom.seq_len - (s1 - s0)) * batch * heads * head_dim * element_size
