"""bsa_ext.distributed: the Ulysses layout helper and sparse context parallelism.

Single-process tests cover the layout arithmetic; two processes (gloo on CPU, NCCL on
GPU, started once per module by ``torch.multiprocessing``) run the cases of
``dist_worker.py`` and each case becomes one test here. The same cases run under
``torchrun --nproc_per_node=2 python_tests/dist_worker.py --backend nccl``.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

import bsa_ext
import dist_worker
from bsa_ext import reference
from bsa_ext.distributed import (
    ChunkShards,
    dense_ring_bytes,
    pool_local,
    sparse_cp_flash_attn_bsa_3d,
    thw_to_ulysses,
    tile_of_rank,
    ulysses_chunks_match,
    ulysses_flash_attn_bsa_3d,
    ulysses_latent_shape,
    ulysses_partition_mismatch,
    ulysses_to_thw,
    ulysses_token_order,
)
from bsa_ext.layout import ChunkGeometry

SPAWN_TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(which: str, dist_backend: str, tmp_path_factory) -> dict:
    """Run every case of ``which`` in 2 processes; {case: {rank: result}}."""
    out = tmp_path_factory.mktemp(f"dist_{which}")
    init = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.start_processes(
        dist_worker.run_cases, args=(2, dist_backend, init, which, str(out)), nprocs=2, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish in {SPAWN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    merged: dict = {}
    for rank in range(2):
        with open(os.path.join(out, f"rank{rank}.json")) as f:
            for name, res in json.load(f).items():
                merged.setdefault(name, {})[rank] = res
    return merged


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    return _spawn("cpu", "gloo", tmp_path_factory)


@pytest.fixture(scope="module")
def nccl_results(tmp_path_factory):
    return _spawn("gpu", "nccl", tmp_path_factory)


def _check(results, name):
    per_rank = results[name]
    errors = [f"rank {r}:\n{res['error']}" for r, res in sorted(per_rank.items()) if res["status"] != "ok"]
    assert not errors, "\n".join(errors)


# ---------------------------------------------------------------- two processes
@pytest.mark.parametrize("name", [c["name"] for c in dist_worker.CASES["cpu"]])
def test_gloo_two_ranks(gloo_results, name):
    _check(gloo_results, name)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("name", [c["name"] for c in dist_worker.CASES["gpu"]])
def test_nccl_two_gpus(nccl_results, name):
    _check(nccl_results, name)


def test_gloo_ulysses_paths_taken(gloo_results):
    # One case runs in place, the other needs the permutation: both code paths ran.
    assert gloo_results["ulysses_1x2_in_place"][0]["in_place"] is True
    assert gloo_results["ulysses_2x1_permuted"][0]["in_place"] is False


def test_gloo_fetch_is_sparse(gloo_results):
    # At most 3 key blocks per query block: most of the other rank's chunks are never requested.
    res = gloo_results["sparse_fp64_cdf_maxblocks"]
    assert sum(r["kv_bytes"] for r in res.values()) < sum(r["ring_bytes"] for r in res.values())


# ---------------------------------------------------------------- one process
@pytest.mark.parametrize(
    "latent,chunk,split,match",
    [
        ((48, 44, 80), (4, 4, 4), (1, 2), True),
        ((48, 44, 80), (4, 4, 4), (2, 1), False),  # 22 rows per tile
        ((48, 44, 80), (4, 4, 4), (2, 2), False),
        ((48, 44, 80), (4, 4, 8), (1, 2), True),
        ((48, 44, 80), (4, 4, 8), (1, 4), False),  # 20 columns per tile
        ((13, 44, 80), (4, 4, 4), (1, 2), False),  # T % t
        ((13, 44, 80), (4, 4, 4), (1, 1), True),  # one rank: always the single-GPU layout
        ((8, 6, 16), (4, 4, 4), (1, 2), True),  # partial edge chunk along an unsplit H
    ],
)
def test_ulysses_partition_conditions(latent, chunk, split, match):
    assert ulysses_chunks_match(latent, chunk, split) is match
    assert bool(ulysses_partition_mismatch(latent, chunk, split)) is not match


@pytest.mark.parametrize("latent,chunk,split", [((8, 8, 16), (4, 4, 4), (2, 2)), ((8, 6, 16), (4, 4, 4), (1, 2))])
def test_ulysses_in_place_has_the_single_gpu_chunks(latent, chunk, split):
    """Same set of token sets: every slab-order chunk, mapped to THW tokens, is a single-GPU chunk."""
    order = ulysses_token_order(latent, split)
    slab = ChunkGeometry(ulysses_latent_shape(latent, split), chunk).token_index()
    single = ChunkGeometry(tuple(latent), chunk).token_index()
    as_sets = lambda tok: sorted(tuple(sorted(r[r >= 0].tolist())) for r in tok)  # noqa: E731
    mapped = torch.where(slab >= 0, order[slab.clamp(min=0)], slab)
    assert as_sets(mapped) == as_sets(single)


def test_ulysses_order_round_trip_and_tiles():
    latent, split = (3, 6, 8), (2, 2)
    x = torch.arange(math.prod(latent)).view(1, 1, -1, 1).double()
    slab = thw_to_ulysses(x, latent, split)
    assert torch.equal(ulysses_to_thw(slab, latent, split), x)
    # The slab order is the ranks' tiles (LongCat's split_cp_2d) one after another.
    tiles = torch.cat([tile_of_rank(x, latent, split, r) for r in range(4)], dim=2)
    assert torch.equal(slab, tiles)


@pytest.mark.parametrize(
    "latent_q,latent_k,chunk_q,chunk_k,split",
    [
        ((8, 8, 16), (8, 8, 16), (4, 4, 4), (4, 4, 4), (2, 2)),  # in place
        ((6, 12, 8), (4, 12, 8), (2, 4, 4), (1, 4, 4), (2, 1)),  # permuted, Sq != Sk
        ((5, 6, 16), (5, 6, 16), (4, 4, 4), (2, 4, 4), (1, 2)),  # T % t != 0: permuted
    ],
)
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_ulysses_helper_equals_single_gpu(latent_q, latent_k, chunk_q, chunk_k, split, scale):
    sq, sk = math.prod(latent_q), math.prod(latent_k)
    q = torch.randn(1, 2, sq, 16, dtype=torch.float64) * scale
    k = torch.randn(1, 2, sk, 16, dtype=torch.float64) * scale
    v = torch.randn(1, 2, sk, 16, dtype=torch.float64)
    single = bsa_ext.flash_attn_bsa_3d(q, k, v, latent_q, latent_k, 0.5, None, chunk_q, chunk_k, backend="torch")
    to_slab = lambda x, lat: thw_to_ulysses(x, lat, split)  # noqa: E731
    out = ulysses_flash_attn_bsa_3d(
        to_slab(q, latent_q), to_slab(k, latent_k), to_slab(v, latent_k), latent_q, latent_k, split, 0.5, None,
        chunk_q, chunk_k, backend="torch",
    )
    torch.testing.assert_close(out, to_slab(single, latent_q), rtol=1e-12, atol=1e-12)


def test_ulysses_naive_call_differs_when_partitions_differ():
    """Why the helper exists: LongCat's latent (cp*T, H/sh, W/sw) changes the chunks when H/sh % h != 0."""
    latent, chunk, split = (4, 12, 8), (2, 4, 4), (2, 1)
    assert not ulysses_chunks_match(latent, chunk, split)
    s = math.prod(latent)
    q, k, v = (torch.randn(1, 1, s, 16, dtype=torch.float64) for _ in range(3))
    single = bsa_ext.flash_attn_bsa_3d(q, k, v, latent, latent, 0.5, None, chunk, chunk, backend="torch")
    qs, ks, vs = (thw_to_ulysses(x, latent, split) for x in (q, k, v))
    naive_latent = ulysses_latent_shape(latent, split)
    naive = bsa_ext.flash_attn_bsa_3d(qs, ks, vs, naive_latent, naive_latent, 0.5, None, chunk, chunk, backend="torch")
    assert not torch.allclose(naive, thw_to_ulysses(single, latent, split))


@pytest.mark.parametrize("latent,chunk", [((7, 6, 10), (2, 4, 4)), ((8, 8, 8), (4, 4, 4)), ((5, 9, 3), (1, 4, 4))])
def test_pool_local_equals_reference(latent, chunk):
    g = ChunkGeometry(latent, chunk)
    x = torch.randn(2, 3, g.seq_len, 8, dtype=torch.float64)
    torch.testing.assert_close(pool_local(x, g), reference.pool_blocks(x, g), rtol=1e-12, atol=1e-12)


def test_chunk_shards_cover_the_sequence():
    shards = ChunkShards.split((7, 6, 10), (2, 4, 4), 3)
    assert shards.rows == (0, 2, 3, 4)
    spans = [shards.token_range(r) for r in range(3)]
    assert spans[0][0] == 0 and spans[-1][1] == 420 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert shards.local_latent(2) == (1, 6, 10)  # the last chunk row holds one frame
    g = shards.geom
    for r in range(3):
        b0, b1 = shards.block_range(r)
        local = shards.local_geometry(r).token_index()
        glob = g.token_index()[b0:b1]
        s0 = shards.token_range(r)[0]
        assert torch.equal(torch.where(local >= 0, local + s0, local), glob)
    with pytest.raises(ValueError, match="rows_per_rank"):
        ChunkShards.split((7, 6, 10), (2, 4, 4), 2, [4, 1])
    with pytest.raises(ValueError, match="world_size"):
        ChunkShards.split((3, 6, 10), (2, 4, 4), 3)


def test_one_rank_without_process_group_equals_single_gpu():
    latent, chunk = (7, 6, 10), (2, 4, 4)
    q, k, v = (torch.randn(1, 2, 420, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    stats = {}
    out = sparse_cp_flash_attn_bsa_3d(q, k, v, latent, latent, 0.5, None, chunk, chunk, backend="torch", stats=stats)
    ref = bsa_ext.flash_attn_bsa_3d(q, k, v, latent, latent, 0.5, None, chunk, chunk, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert stats.get("kv", 0) == 0
    assert dense_ring_bytes(ChunkShards.split(latent, chunk, 1), 0, 1, 2, 16, 8) == 0


def test_whole_shard_assumption_needs_near_certain_coverage():
    from bsa_ext.distributed import sparse_cp

    w720 = ChunkShards.split((48, 44, 80), (4, 4, 4), 2)
    assert sparse_cp._assume_whole(165, w720, w720)  # K = 165 of 2640 blocks, 1320 query blocks per rank
    assert not sparse_cp._assume_whole(None, w720, w720)  # no bound given: requests are exchanged
    assert not sparse_cp._assume_whole(1, w720, w720)  # 1 - (1 - 1/2640)^1320 ~ 0.39
    small = ChunkShards.split((7, 6, 10), (2, 4, 4), 2, [3, 1])  # 6 query blocks on rank 1
    assert not sparse_cp._assume_whole(12, small, small)  # 1 - 0.5^6 < 0.999 for rank 1's requests
    default = sparse_cp._WHOLE_SHARD_AT
    try:
        sparse_cp._WHOLE_SHARD_AT = 2.0  # whole shards switched off: never assumed either
        assert not sparse_cp._assume_whole(165, w720, w720)
    finally:
        sparse_cp._WHOLE_SHARD_AT = default
