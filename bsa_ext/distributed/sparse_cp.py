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
3. ``all_to_all_single`` of request masks ``[B, H, Nk_o]`` (uint8) to every owner, then one
   host sync for the sizes of what travels;
4. per (owner, requester) pair, point-to-point (``batch_isend_irecv``): the owner's whole
   K/V shard when the requester wants at least ``_WHOLE_SHARD_AT`` of its chunks (the
   usual case at LongCat's sparsity: the union of a shard's selections covers nearly
   everything), else the valid token rows of the requested chunks;
5. with ``overlap=True`` (default for fp16/bf16) the attention over the blocks this rank
   owns runs while the fetch is in flight, then one attention per whole shard received
   (ids local to it, no copy) and one over the row-fetched chunks, merged by their LSE;
   with ``overlap=False`` (default for fp32/fp64, where the fp32 LSE of the merge would
   cost precision) one call covers all blocks after the fetch, exactly the single-GPU
   computation.

Row-fetched chunks land at their own token positions in a K/V buffer of the global key
length, so the kernels run on the global key geometry with the global block ids: no index
remapping, partial edge chunks stay masked. The buffer is transient (built in forward and
again in backward); only the received shards and rows are kept for backward.

Backward: one attention-backward call over all selected blocks with the merged
``out``/``lse``; dK/dV of fetched shards and rows go back to their owners by the reverse
point-to-point exchange and are added in fp32 there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..layout import ChunkGeometry, as_shape3, topk_count

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


def _pool(x: torch.Tensor, geom: ChunkGeometry, backend: str) -> torch.Tensor:
    """``pool_local`` on ``backend``: fp32 ``[B, H, N, D]`` (fp64 on CPU for the torch backend)."""
    if backend == "cuda":
        return torch.ops.bsa.cuda_pool_blocks(x, geom.as_ints())
    if backend == "triton":
        from ..triton.select import pool

        return pool(x, geom).view(*x.shape[:2], geom.num_blocks, x.shape[-1])
    return pool_local(x, geom)


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
    ``counts int32 [B, H, Nq_r]``. Only the pooled keys travel (``all_gather``). Pooling,
    scores and choice run on ``backend``, resolved as ``select_blocks`` resolves it for q.
    """
    from .. import _validate, ops

    _validate.selection_params(sparsity, cdf_threshold, max_blocks)
    rank, world = _world(group)
    _check_shard("q", q, shards_q, rank, world)
    _check_shard("k", k, shards_k, rank, world)
    geom_q = shards_q.local_geometry(rank)
    backend = ops.resolve_backend(backend, "select", q, geom_q, shards_k.geom)
    k_cmp = _pool(k, shards_k.local_geometry(rank), backend)
    widest = max(shards_k.block_range(r)[1] - shards_k.block_range(r)[0] for r in range(world))
    if world > 1:
        # all_gather needs equal sizes: pad every rank's pooled keys to the widest shard.
        padded = F.pad(k_cmp, (0, 0, 0, widest - k_cmp.shape[2])).contiguous()
        parts = [torch.empty_like(padded) for _ in range(world)]
        work = dist.all_gather(parts, padded, group=group, async_op=True)
        q_cmp = _pool(q, geom_q, backend)
        work.wait()
        spans = [shards_k.block_range(r) for r in range(world)]
        k_cmp = torch.cat([p[:, :, : b1 - b0] for p, (b0, b1) in zip(parts, spans)], dim=2)
        _add(stats, "pooled_keys", (world - 1) * _nbytes(padded))
    else:
        q_cmp = _pool(q, geom_q, backend)
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
# A requester that wants at least this fraction of an owner's (batch, head, chunk) blocks gets
# the owner's whole K/V shard instead: at most 1/0.75 of the requested bytes, and no gather on
# the owner, no scatter into a global-length buffer on the requester (the shard is attended
# as it arrives). On video-like inputs at sparsity 0.9375 the requests cover ~100% of the other
# shards (docs/distributed.md), so this is the common case. Requester and owner decide from
# the same request bits, so they always agree. Tests move it to force either mode.
_WHOLE_SHARD_AT = 0.75
# With a lower bound m on every query block's count (sparse_cp_flash_attn_bsa_3d knows it from
# sparsity / max_blocks), n query blocks choosing m of Nk key blocks each leave a given key
# block unchosen with probability (1 - m/Nk)^n if the choices were independent. When that
# puts the expected coverage of every pair at this level or above, all pairs exchange whole
# shards without first exchanging requests: no request masks, no host sync. Selections that
# are more local than random only make the whole shard carry more than was needed; what is
# computed is the same either way.
_ASSUME_WHOLE_AT = 0.999


def _assume_whole(min_count: Optional[int], shards_q: "ChunkShards", shards_k: "ChunkShards") -> bool:
    """Whether every (requester, owner) pair may skip the request exchange (same answer on every rank)."""
    if min_count is None or min_count < 1 or _WHOLE_SHARD_AT > 1.0:
        return False
    nk = shards_k.geom.num_blocks
    for r in range(shards_q.world_size):
        b0, b1 = shards_q.block_range(r)
        if 1.0 - (1.0 - min(min_count, nk) / nk) ** (b1 - b0) < max(_ASSUME_WHOLE_AT, _WHOLE_SHARD_AT):
            return False
    return True


@dataclass
class _Plan:
    """What travels between this rank and each peer (lists indexed by group rank).

    ``whole_in[o]``: this rank receives owner ``o``'s whole K/V shard; ``whole_out[r]``: it
    sends its whole shard to requester ``r``. Other pairs move the valid token rows of the
    requested chunks, chunk by chunk in row-major (batch, head, chunk) order, so sender and
    receiver derive the same order from the same request masks.
    """

    whole_in: List[bool]
    whole_out: List[bool]
    recv_rows: List[int]  # rows received from each row-fetching owner
    send_rows: List[int]  # rows sent to each row-fetching requester
    recv_at: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (b, h, global token) of each received row
    send_at: Tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (b, h, local token) of each sent row


@functools.lru_cache(maxsize=32)
def _token_index(geom: ChunkGeometry, device: torch.device) -> torch.Tensor:
    """``geom.token_index(device)``, built once per geometry and device: each build is ~20 tiny
    kernels, and the plan needs it for the global and the local key geometry on every call.
    Read-only for its users."""
    return geom.token_index(device)


def _valid_counts(geom: ChunkGeometry, device: torch.device) -> torch.Tensor:
    return (_token_index(geom, device) >= 0).sum(-1)


def _valid_rows(geom: ChunkGeometry, b, h, j, n_rows: int):
    """(b, h, token) of the ``n_rows`` valid rows of chunks (b, h, j), chunk by chunk (no host sync)."""
    tok = _token_index(geom, b.device)[j]
    flat = torch.nonzero_static((tok >= 0).flatten(), size=n_rows).squeeze(1)
    chunk = torch.div(flat, tok.shape[-1], rounding_mode="floor")
    return b[chunk], h[chunk], tok.flatten()[flat]


def _plan(indices, counts, shards_k: ChunkShards, rank, world, group, stats, assume_whole: bool = False) -> _Plan:
    B, H, _, kmax = indices.shape
    geom = shards_k.geom
    nk = geom.num_blocks
    device = indices.device
    if assume_whole:
        none = torch.zeros(0, dtype=torch.long, device=device)
        peers = [r != rank for r in range(world)]
        return _Plan(peers, list(peers), [0] * world, [0] * world, (none, none, none), (none, none, none))
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
    # The one host synchronisation: chunk and row counts wanted from each owner and asked by
    # each requester (split sizes and the whole-shard decisions are host values).
    valid = _valid_counts(geom, device)
    wanted = [need[..., s0:s1].long() for s0, s1 in spans]
    asked = requests.long()
    sizes = torch.stack(
        [w.sum() for w in wanted] + [(w * valid[s0:s1]).sum() for w, (s0, s1) in zip(wanted, spans)]
        + list(asked.flatten(1).sum(1)) + list((asked * valid[b0:b1]).flatten(1).sum(1))
    ).tolist()
    want_chunks, want_rows = sizes[:world], sizes[world:2 * world]
    ask_chunks, ask_rows = sizes[2 * world:3 * world], sizes[3 * world:]

    def whole(n_chunks: int, span: Tuple[int, int]) -> bool:
        return n_chunks > 0 and n_chunks >= _WHOLE_SHARD_AT * B * H * (span[1] - span[0])

    whole_in = [r != rank and whole(want_chunks[r], spans[r]) for r in range(world)]
    whole_out = [r != rank and whole(ask_chunks[r], (b0, b1)) for r in range(world)]
    recv_rows = [0 if whole_in[r] or r == rank else want_rows[r] for r in range(world)]
    send_rows = [0 if whole_out[r] or r == rank else ask_rows[r] for r in range(world)]
    # Row-fetched chunks, owner by owner (requester by requester), row-major (b, h, j) in each.
    empty = torch.zeros((0, 3), dtype=torch.long, device=device)
    recv = [torch.nonzero_static(need[..., s0:s1], size=want_chunks[r]) + torch.tensor([0, 0, s0], device=device)
            for r, (s0, s1) in enumerate(spans) if recv_rows[r]]
    sent = [torch.nonzero_static(requests[r], size=ask_chunks[r]) for r in range(world) if send_rows[r]]
    recv = torch.cat(recv) if recv else empty
    sent = torch.cat(sent) if sent else empty
    return _Plan(
        whole_in, whole_out, recv_rows, send_rows,
        _valid_rows(geom, recv[:, 0], recv[:, 1], recv[:, 2], sum(recv_rows)),
        _valid_rows(shards_k.local_geometry(rank), sent[:, 0], sent[:, 1], sent[:, 2], sum(send_rows)),
    )


def _flat_rows(x: torch.Tensor, at) -> torch.Tensor:
    """Row numbers of the (b, h, token) triple ``at`` in ``x.view(-1, D)`` (x contiguous)."""
    b, h, t = at
    return (b * x.shape[1] + h) * x.shape[2] + t


def _gather_rows(x: torch.Tensor, at) -> torch.Tensor:
    # One index_select over flat rows: several times faster than three-tensor advanced indexing.
    return x.reshape(-1, x.shape[-1]).index_select(0, _flat_rows(x, at))


def _exchange(sends, recvs, group) -> list:
    """Point-to-point sends and receives, ``[(group rank, tensor)]`` each, as one batch.

    Per pair the order of tensors is the same on both sides (K then V). Returns the works
    to wait on (none in a one-rank world).
    """
    if not sends and not recvs:
        return []

    def peer(r: int) -> int:
        return r if group is None else dist.get_global_rank(group, r)

    ops = [dist.P2POp(dist.isend, t, peer(r), group) for r, t in sends]
    ops += [dist.P2POp(dist.irecv, t, peer(r), group) for r, t in recvs]
    return dist.batch_isend_irecv(ops)


def _wait(works) -> None:
    for w in works:
        w.wait()


def _rows_by_peer(k, v, at, rows: List[int]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """The K and V rows at ``at`` (laid out peer by peer, ``rows[r]`` for peer ``r``), gathered
    once and split per peer: ``{r: (k_rows, v_rows)}`` for the peers with rows."""
    if not sum(rows):
        return {}
    parts_k, parts_v = torch.split(_gather_rows(k, at), rows), torch.split(_gather_rows(v, at), rows)
    return {r: (parts_k[r], parts_v[r]) for r in range(len(rows)) if rows[r]}


def _fetch(k, v, shards_k: ChunkShards, rank, plan: _Plan, group):
    """Starts this rank's K/V sends and receives; returns (works, received).

    ``received[o]`` is ``(k_o, v_o)``: owner ``o``'s whole shard ``[B, H, S_o, D]`` when
    ``plan.whole_in[o]``, else its requested rows ``[rows, D]`` (in ``plan.recv_at`` order).
    """
    B, H, _, D = k.shape
    sends, recvs, received = [], [], {}
    rows = _rows_by_peer(k, v, plan.send_at, plan.send_rows)
    for r in range(len(plan.whole_in)):
        if plan.whole_out[r]:
            sends += [(r, k), (r, v)]
        elif r in rows:
            sends += [(r, rows[r][0]), (r, rows[r][1])]
        if plan.whole_in[r]:
            s0, s1 = shards_k.token_range(r)
            shape = (B, H, s1 - s0, D)
        elif plan.recv_rows[r]:
            shape = (plan.recv_rows[r], D)
        else:
            continue
        received[r] = (k.new_empty(shape), v.new_empty(shape))
        recvs += [(r, received[r][0]), (r, received[r][1])]
    return _exchange(sends, recvs, group), received


def _received_bytes(received) -> int:
    return sum(_nbytes(a) + _nbytes(b) for a, b in received.values())


def _buffers(k, v, shards_k: ChunkShards, rank, plan: _Plan, received, own: bool = True,
             whole: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global-length K/V holding the row-fetched chunks at their positions, plus this rank's
    shard if ``own`` and the whole shards received if ``whole``."""
    B, H, _, D = k.shape
    shape = (B, H, shards_k.geom.seq_len, D)
    if _BUFFER_FILL is None:
        kbuf = torch.empty(shape, dtype=k.dtype, device=k.device)
        vbuf = torch.empty(shape, dtype=v.dtype, device=v.device)
    else:
        kbuf = torch.full(shape, _BUFFER_FILL, dtype=k.dtype, device=k.device)
        vbuf = torch.full(shape, _BUFFER_FILL, dtype=v.dtype, device=v.device)
    shards = [(rank, k, v)] if own else []
    if whole:
        shards += [(r, *received[r]) for r in received if plan.whole_in[r]]
    for r, kr, vr in shards:
        s0, s1 = shards_k.token_range(r)
        kbuf[:, :, s0:s1] = kr
        vbuf[:, :, s0:s1] = vr
    rows = [r for r in received if not plan.whole_in[r]]
    if rows:
        at = _flat_rows(kbuf, plan.recv_at)
        kbuf.view(-1, D).index_copy_(0, at, torch.cat([received[r][0] for r in rows]))
        vbuf.view(-1, D).index_copy_(0, at, torch.cat([received[r][1] for r in rows]))
    return kbuf, vbuf


def _compact(ids, mask):
    """Kept entries move to the front in their original order (a prefix count gives each its
    slot; the others all land in a spare last column that is dropped). No sort, no sync."""
    kmax = ids.shape[-1]
    slot = torch.where(mask, torch.cumsum(mask, dim=-1) - 1, kmax)
    out = torch.full((*ids.shape[:-1], kmax + 1), -1, dtype=torch.int32, device=ids.device)
    out.scatter_(-1, slot, ids.to(torch.int32))
    return out[..., :kmax].contiguous(), mask.sum(-1).to(torch.int32)


def _split_lists(indices, counts, ranges, rest: bool = True):
    """Block lists split by key block range: for each ``(lo, hi)`` of ``ranges`` the entries
    inside it as ids local to it, then (if ``rest``) all other entries as global ids. Exact
    counts per part keep the Hopper forward's launch order by count meaningful (measured:
    lists with -1 holes and the full counts ran the two attention calls ~1 ms slower at W720)."""
    kmax = indices.shape[-1]
    live = torch.arange(kmax, device=indices.device) < counts[..., None]
    others = live.clone() if rest else None
    out = []
    for lo, hi in ranges:
        mask = (indices >= lo) & (indices < hi) & live
        if rest:
            others &= ~mask
        out.append(_compact(indices - lo, mask))
    if rest:
        out.append(_compact(indices, others))
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
    def forward(ctx, q, k, v, indices, counts, shards_q, shards_k, sm_scale, backend, overlap, group, stats, min_count):
        from .. import ops

        rank, world = _world(group)
        geom_k = shards_k.geom
        k, v = k.contiguous(), v.contiguous()
        # Resolved once: every attention call and the merges run on the same backend.
        backend = ops.resolve_backend(backend, "forward", q, shards_q.local_geometry(rank), geom_k)
        plan = _plan(indices, counts, shards_k, rank, world, group, stats, _assume_whole(min_count, shards_q, shards_k))
        works, received = _fetch(k, v, shards_k, rank, plan, group)
        _add(stats, "kv", _received_bytes(received))
        _add(stats, "kv_whole", _received_bytes({r: t for r, t in received.items() if plan.whole_in[r]}))
        latent_q = list(shards_q.local_latent(rank))
        chunk_q, chunk_k = list(shards_q.geom.chunk), list(geom_k.chunk)

        def attend(kk, vv, ids, n, latent_k):
            return torch.ops.bsa.forward(q, kk, vv, ids, n, latent_q, list(latent_k), chunk_q, chunk_k, sm_scale, backend)

        if overlap:
            whole = [r for r in received if plan.whole_in[r]]
            rows = len(whole) < len(received)  # some owners sent rows: their blocks keep global ids
            parts = _split_lists(indices, counts, [shards_k.block_range(r) for r in [rank, *whole]], rest=rows)
            # The blocks this rank owns need no data from others: attend to them while the fetch runs.
            out, lse = attend(k, v, *parts[0], shards_k.local_latent(rank))
            _wait(works)
            for r, (ids, n) in zip(whole, parts[1:]):
                # A whole shard is attended as it arrived, with ids local to it.
                out, lse = _merge(out, lse, *attend(*received[r], ids, n, shards_k.local_latent(r)), backend)
            if rows:
                kbuf, vbuf = _buffers(k, v, shards_k, rank, plan, received, own=False, whole=False)
                out, lse = _merge(out, lse, *attend(kbuf, vbuf, *parts[-1], geom_k.latent), backend)
                del kbuf, vbuf
        else:
            _wait(works)
            kbuf, vbuf = _buffers(k, v, shards_k, rank, plan, received)
            out, lse = attend(kbuf, vbuf, indices, counts, geom_k.latent)
            del kbuf, vbuf
        peers = sorted(received)
        ctx.save_for_backward(q, k, v, out, lse, indices, counts, *[t for r in peers for t in received[r]])
        ctx.peers = peers
        ctx.plan, ctx.shards, ctx.sm_scale, ctx.backend, ctx.group, ctx.stats = plan, (shards_q, shards_k), sm_scale, backend, group, stats
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, indices, counts, *flat = ctx.saved_tensors
        received = {r: (flat[2 * i], flat[2 * i + 1]) for i, r in enumerate(ctx.peers)}
        plan, (shards_q, shards_k), group = ctx.plan, ctx.shards, ctx.group
        rank, world = _world(group)
        geom_k = shards_k.geom
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        kbuf, vbuf = _buffers(k, v, shards_k, rank, plan, received)
        dq, dkbuf, dvbuf = torch.ops.bsa.backward(
            grad_out, q, kbuf, vbuf, out, lse, indices, counts, list(shards_q.local_latent(rank)), list(geom_k.latent),
            list(shards_q.geom.chunk), list(geom_k.chunk), ctx.sm_scale, ctx.backend,
        )
        del kbuf, vbuf
        # Gradients of fetched K/V go home (the reverse of the forward's exchange) and are
        # added in fp32 by their owner: several requesters may return gradients for one chunk.
        sends, recvs = [], []
        grad_rows = _rows_by_peer(dkbuf, dvbuf, plan.recv_at, plan.recv_rows)
        for r in received:
            if plan.whole_in[r]:
                s0, s1 = shards_k.token_range(r)
                sends += [(r, dkbuf[:, :, s0:s1].contiguous()), (r, dvbuf[:, :, s0:s1].contiguous())]
            else:
                sends += [(r, grad_rows[r][0]), (r, grad_rows[r][1])]
        back = {}
        for r in range(world):
            if plan.whole_out[r]:
                back[r] = (torch.empty_like(k), torch.empty_like(v))
            elif plan.send_rows[r]:
                back[r] = (k.new_empty((plan.send_rows[r], k.shape[-1])), v.new_empty((plan.send_rows[r], v.shape[-1])))
            else:
                continue
            recvs += [(r, back[r][0]), (r, back[r][1])]
        _wait(_exchange(sends, recvs, group))
        _add(ctx.stats, "grad_kv", _received_bytes(back))
        s0, s1 = shards_k.token_range(rank)
        acc = torch.promote_types(k.dtype, torch.float32)
        dk = dkbuf[:, :, s0:s1].to(acc)
        dv = dvbuf[:, :, s0:s1].to(acc)
        rows = [r for r in back if not plan.whole_out[r]]
        if rows:
            dk.index_put_(plan.send_at, torch.cat([back[r][0] for r in rows]).to(acc), accumulate=True)
            dv.index_put_(plan.send_at, torch.cat([back[r][1] for r in rows]).to(acc), accumulate=True)
        for r in back:
            if plan.whole_out[r]:
                dk += back[r][0]
                dv += back[r][1]
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None, None, None


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
    min_count: Optional[int] = None,
):
    """Attention of this rank's query shard over the globally numbered key blocks in
    ``indices`` (as ``sparse_cp_select`` returns them), fetching only those blocks.
    Differentiable in q, k and v (this rank's shards). ``stats`` collects the bytes this
    rank received, by phase.

    ``min_count``: a lower bound on every entry of ``counts``, the same on every rank
    (``sparse_cp_flash_attn_bsa_3d`` passes the top-k count). When it makes the requests
    of every rank cover (almost surely) the other shards, whole shards are exchanged
    without exchanging requests first, which saves a host synchronisation. A performance
    hint only: the result is the same with any value."""
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
    out, lse = _SparseCPAttention.apply(
        q, k, v, indices, counts, shards_q, shards_k, scale, backend, overlap, group, stats, min_count
    )
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
    # Every count is at least K in top-k and cdf + top-k modes, at least 1 with cdf alone.
    min_count = topk_count(shards_k.geom.num_blocks, sparsity) if sparsity is not None else 1
    if max_blocks is not None:
        min_count = min(min_count, max_blocks)
    return sparse_cp_attention(
        q, k, v, indices, counts, shards_q, shards_k, backend=backend, overlap=overlap, group=group, stats=stats,
        return_lse=return_lse, min_count=min_count,
    )


def dense_ring_bytes(shards_k: ChunkShards, rank: int, batch: int, heads: int, head_dim: int, element_size: int) -> int:
    """What a dense ring attention brings to ``rank`` in the forward: every K and V token it does not own."""
    s0, s1 = shards_k.token_range(rank)
    return 2 * (shards_k.geom.seq_len - (s1 - s0)) * batch * heads * head_dim * element_size
