"""Multi-process checks of bsa_ext.distributed against the single-process result.

Launched two ways:
* by ``test_distributed.py`` through ``torch.multiprocessing`` (gloo on CPU, NCCL on GPU);
* by hand on a multi-GPU machine:
  ``torchrun --nproc_per_node=2 python_tests/dist_worker.py --backend nccl``
  (``--backend gloo`` runs the CPU cases). Rank 0 prints one line per case; the exit
  status is 1 when any case failed.

Every rank builds the same global inputs from a seed, takes its shard, runs the
distributed path and compares its shard of outputs and gradients with the single-process
run: the fp64 reference ``ref``, the low-precision reference ``pt`` (the tolerance rule of
helpers.assert_close_rule) and, on GPU, the single-GPU kernels.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
try:
    import bsa_ext  # noqa: E402
except ImportError:  # run from a source checkout without an install
    sys.path.insert(0, os.path.dirname(_HERE))
    import bsa_ext  # noqa: E402
from bsa_ext import reference  # noqa: E402
from bsa_ext.distributed import sparse_cp  # noqa: E402
from bsa_ext.distributed import (  # noqa: E402
    ChunkShards,
    dense_ring_bytes,
    sparse_cp_attention,
    sparse_cp_select,
    tile_of_rank,
    ulysses_attention,
    ulysses_chunks_match,
)
from bsa_ext.layout import ChunkGeometry  # noqa: E402
from helpers import assert_close_rule, low_precision_attention  # noqa: E402

# Sparse context-parallel cases: non-divisible latents, uneven shards, Sq != Sk, q/k chunks differing.
# ``whole_at`` sets sparse_cp._WHOLE_SHARD_AT: 0.0 sends every requested-from shard whole, 2.0
# never does (rows of the requested chunks only); unset keeps the library's rule.
SPARSE_CPU = [
    dict(name="sparse_fp64_uneven", dtype="float64", latent_q=(7, 6, 10), latent_k=(7, 6, 10), chunk_q=(2, 4, 4),
         chunk_k=(2, 4, 4), rows_q=(3, 1), rows_k=(1, 3), sparsity=0.5, cdf=None, overlap=True, scale=1.0, whole_at=0.0),
    dict(name="sparse_fp64_sq_ne_sk_cdf", dtype="float64", latent_q=(5, 6, 8), latent_k=(9, 5, 7), chunk_q=(1, 4, 4),
         chunk_k=(2, 2, 8), rows_q=None, rows_k=(2, 3), sparsity=0.75, cdf=0.9, overlap=False, scale=4.0,
         whole_at=2.0),
    dict(name="sparse_fp32_fused_x16", dtype="float32", latent_q=(8, 8, 8), latent_k=(8, 8, 8), chunk_q=(2, 4, 4),
         chunk_k=(2, 4, 4), rows_q=None, rows_k=None, sparsity=0.75, cdf=None, overlap=False, scale=16.0, fused=True,
         whole_at=0.0),
    dict(name="sparse_fp32_overlap_x4", dtype="float32", latent_q=(8, 8, 8), latent_k=(6, 8, 8), chunk_q=(2, 4, 4),
         chunk_k=(2, 2, 4), rows_q=(3, 1), rows_k=None, sparsity=0.6, cdf=None, overlap=True, scale=4.0, whole_at=2.0,
         subgroup=True),
    # min_count lets every pair assume its requests cover the other shard: whole shards, no requests exchanged.
    dict(name="sparse_fp64_whole_without_requests", dtype="float64", latent_q=(8, 8, 16), latent_k=(8, 8, 16),
         chunk_q=(2, 4, 4), chunk_k=(2, 4, 4), rows_q=None, rows_k=None, sparsity=0.5, cdf=None, overlap=True,
         scale=1.0, min_count=16, subgroup=True),
    dict(name="sparse_fp64_cdf_maxblocks", dtype="float64", latent_q=(6, 9, 9), latent_k=(6, 9, 9), chunk_q=(2, 4, 4),
         chunk_k=(1, 4, 4), rows_q=(1, 2), rows_k=(4, 2), sparsity=None, cdf=0.6, max_blocks=3, overlap=True, scale=1.0),
]
ULYSSES_CPU = [
    # W/sw = 8 is a multiple of w, T % t == 0: runs in place; H = 6 leaves a partial edge chunk.
    dict(name="ulysses_1x2_in_place", kind="ulysses", dtype="float64", latent_q=(4, 6, 16), latent_k=(4, 6, 16),
         chunk_q=(4, 4, 4), chunk_k=(4, 4, 4), split=(1, 2), sparsity=0.5, cdf=None, scale=1.0),
    # H/sh = 6 is no multiple of h: goes through the THW permutation; Sq != Sk (conditioning-like).
    dict(name="ulysses_2x1_permuted", kind="ulysses", dtype="float64", latent_q=(6, 12, 8), latent_k=(4, 12, 8),
         chunk_q=(2, 4, 4), chunk_k=(1, 4, 4), split=(2, 1), sparsity=0.6, cdf=None, scale=4.0),
]
SPARSE_GPU = [
    dict(name="gpu_sparse_bf16_uneven", dtype="bfloat16", latent_q=(9, 12, 20), latent_k=(9, 12, 20), chunk_q=(4, 4, 4),
         chunk_k=(4, 4, 4), rows_q=(2, 1), rows_k=(1, 2), sparsity=0.75, cdf=None, overlap=True, scale=1.0, heads=2,
         head_dim=128, whole_at=0.0),
    dict(name="gpu_sparse_fp16_no_overlap_x4", dtype="float16", latent_q=(8, 16, 16), latent_k=(12, 16, 16),
         chunk_q=(4, 4, 4), chunk_k=(4, 4, 8), rows_q=None, rows_k=None, sparsity=0.875, cdf=None, overlap=False,
         scale=4.0, heads=2, head_dim=128, whole_at=2.0),
    dict(name="gpu_sparse_bf16_cdf_x16", dtype="bfloat16", latent_q=(8, 12, 16), latent_k=(8, 12, 16), chunk_q=(4, 4, 4),
         chunk_k=(4, 4, 4), rows_q=None, rows_k=None, sparsity=0.875, cdf=0.9, overlap=True, scale=16.0, heads=2,
         head_dim=64, whole_at=2.0),
]
ULYSSES_GPU = [
    dict(name="gpu_ulysses_1x2", kind="ulysses", dtype="bfloat16", latent_q=(8, 12, 16), latent_k=(8, 12, 16),
         chunk_q=(4, 4, 4), chunk_k=(4, 4, 4), split=(1, 2), sparsity=0.75, cdf=None, scale=1.0, heads=4, head_dim=128),
    dict(name="gpu_ulysses_2x1_permuted", kind="ulysses", dtype="bfloat16", latent_q=(8, 12, 16), latent_k=(8, 12, 16),
         chunk_q=(4, 4, 4), chunk_k=(4, 4, 4), split=(2, 1), sparsity=0.75, cdf=None, scale=4.0, heads=4, head_dim=128),
]
CASES = {"cpu": SPARSE_CPU + ULYSSES_CPU, "gpu": SPARSE_GPU + ULYSSES_GPU}


def _inputs(case, device):
    """Global q, k, v (THW order), dout, identical on every rank."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    dtype = getattr(torch, case["dtype"])
    B, H, D = 1, case.get("heads", 2), case.get("head_dim", 16)
    sq, sk = (int(torch.tensor(case[n]).prod()) for n in ("latent_q", "latent_k"))
    s = case["scale"]
    if case.get("fused"):
        qkv = (torch.randn(B, sq, 3, H, D, generator=gen, dtype=torch.float64) * s).to(dtype)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
        q, k, v = (x.to(device) for x in (q, k, v)) if device != "cpu" else (q, k, v)
    else:
        q = (torch.randn(B, H, sq, D, generator=gen, dtype=torch.float64) * s).to(dtype).to(device)
        k = (torch.randn(B, H, sk, D, generator=gen, dtype=torch.float64) * s).to(dtype).to(device)
        v = torch.randn(B, H, sk, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
    dout = torch.randn(B, H, sq, D, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return q, k, v, dout


def _truth(case, q, k, v, dout, indices, counts, backend):
    """Single-process results: fp64 reference, low-precision reference ``pt`` and the backend's own."""
    gq = ChunkGeometry(tuple(case["latent_q"]), tuple(case["chunk_q"]))
    gk = ChunkGeometry(tuple(case["latent_k"]), tuple(case["chunk_k"]))
    d = [x.double() for x in (q, k, v, dout)]
    ref_out, _ = reference.attention_forward(*d[:3], indices, counts, gq, gk)
    ref_grads = reference.attention_backward(d[3], *d[:3], indices, counts, gq, gk)
    # pt: the same attention computed in the inputs' dtype (the tolerance rule's low-precision run).
    pt = [low_precision_attention(q, k, v, indices, counts, gq, gk)]
    pt += list(low_precision_attention(q, k, v, indices, counts, gq, gk, dout=dout))
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    args = (case["latent_q"], case["latent_k"], case["chunk_q"], case["chunk_k"])
    one = bsa_ext.block_sparse_attention(qs, ks, vs, indices, counts, *args, backend=backend)
    one.backward(dout)
    return [ref_out, *ref_grads], pt, [one.detach(), qs.grad, ks.grad, vs.grad]


def _compare(name, got, ref, pt, single, floor):
    for label, g, r, p, s in zip(("out", "dq", "dk", "dv"), got, ref, pt, single):
        assert_close_rule(g, r, p, f"{name}: {label} vs fp64 reference", floor)
        # Same rule against the single-process run on the same backend (rounding of both counted).
        assert_close_rule(g, s.double(), p, f"{name}: {label} vs single-process", floor)


def run_sparse(case, rank, world, device, backend, group=None):
    q, k, v, dout = _inputs(case, device)
    lq, lk, cq, ck = case["latent_q"], case["latent_k"], case["chunk_q"], case["chunk_k"]
    sel = (case["sparsity"], case["cdf"])
    g_idx, g_cnt = bsa_ext.select_blocks(q, k, lq, lk, cq, ck, *sel, max_blocks=case.get("max_blocks"), backend=backend)
    shards_q = ChunkShards.split(lq, cq, world, case["rows_q"])
    shards_k = ChunkShards.split(lk, ck, world, case["rows_k"])
    qr, kr, vr, dr = shards_q.shard(q, rank), shards_k.shard(k, rank), shards_k.shard(v, rank), shards_q.shard(dout, rank)
    stats = {}
    idx, cnt = sparse_cp_select(qr, kr, shards_q, shards_k, *sel, case.get("max_blocks"), backend=backend, group=group,
                                stats=stats)
    b0, b1 = shards_q.block_range(rank)
    exact_selection = device == "cpu"
    rows_same = _same_selection(idx, cnt, g_idx[:, :, b0:b1], g_cnt[:, :, b0:b1])
    if exact_selection:
        assert rows_same == 1.0, f"{case['name']}: selection differs from the single-process one on {1 - rows_same:.2%} of rows"
    else:
        # fp32 scores summed in another order may flip near-ties; the attention check below uses one selection.
        assert rows_same >= 0.99, f"{case['name']}: selection agrees on only {rows_same:.2%} of rows"
        idx, cnt = g_idx[:, :, b0:b1].contiguous(), g_cnt[:, :, b0:b1].contiguous()
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (qr, kr, vr))
    default_whole_at = sparse_cp._WHOLE_SHARD_AT
    sparse_cp._WHOLE_SHARD_AT = case.get("whole_at", default_whole_at)
    try:
        out = sparse_cp_attention(qs, ks, vs, idx, cnt, shards_q, shards_k, backend=backend, overlap=case["overlap"],
                                  group=group, stats=stats, min_count=case.get("min_count"))
        out.backward(dr)
    finally:
        sparse_cp._WHOLE_SHARD_AT = default_whole_at
    ref, pt, single = _truth(case, q, k, v, dout, g_idx, g_cnt, backend)
    cut = [shards_q.shard, shards_q.shard, shards_k.shard, shards_k.shard]
    floor = 1e-6 if q.dtype == torch.float64 else 1e-5
    _compare(case["name"], [out, qs.grad, ks.grad, vs.grad], *[[c(x, rank) for c, x in zip(cut, group_)]
                                                                for group_ in (ref, pt, single)], floor)
    B, H, _, D = k.shape
    ring = dense_ring_bytes(shards_k, rank, B, H, D, k.element_size())
    assert stats.get("kv", 0) <= ring, f"{case['name']}: fetched {stats.get('kv')} bytes > dense ring {ring}"
    if case.get("whole_at") == 0.0:  # every shard this rank fetched from came whole
        assert stats.get("kv_whole", 0) == stats.get("kv", 0) > 0, f"{case['name']}: {stats}"
    if case.get("min_count"):  # assumed covered: whole shards, and no request masks were exchanged
        assert stats.get("kv_whole", 0) == stats.get("kv", 0) > 0 and "requests" not in stats, f"{case['name']}: {stats}"
    if case.get("whole_at") == 2.0:  # only requested rows travelled
        assert stats.get("kv_whole", 0) == 0 and stats.get("kv", 0) > 0, f"{case['name']}: {stats}"
    return {"kv_bytes": stats.get("kv", 0), "ring_bytes": ring, **{k_: v_ for k_, v_ in stats.items() if k_ != "kv"}}


def _same_selection(idx, cnt, g_idx, g_cnt) -> float:
    """Fraction of query rows whose counts and index sets agree."""
    kmax = idx.shape[-1]
    live = torch.arange(kmax, device=idx.device) < cnt[..., None]
    glive = torch.arange(g_idx.shape[-1], device=idx.device) < g_cnt[..., None]
    a = torch.where(live, idx, torch.full_like(idx, 1 << 30)).sort(-1).values
    b = torch.where(glive, g_idx, torch.full_like(g_idx, 1 << 30)).sort(-1).values
    width = max(a.shape[-1], b.shape[-1])
    a = torch.nn.functional.pad(a, (0, width - a.shape[-1]), value=1 << 30)
    b = torch.nn.functional.pad(b, (0, width - b.shape[-1]), value=1 << 30)
    same = (cnt == g_cnt) & (a == b).all(-1)
    return same.double().mean().item()


def run_ulysses(case, rank, world, device, backend, group=None):
    q, k, v, dout = _inputs(case, device)
    lq, lk, cq, ck, split = case["latent_q"], case["latent_k"], case["chunk_q"], case["chunk_k"], case["split"]
    sel = (case["sparsity"], case["cdf"])
    tiles = [tile_of_rank(x, lat, split, rank) for x, lat in ((q, lq), (k, lk), (v, lk), (dout, lq))]
    qs, ks, vs = (x.detach().clone().requires_grad_() for x in tiles[:3])
    out = ulysses_attention(qs, ks, vs, lq, lk, split, *sel, cq, ck, group=group, backend=backend)
    out.backward(tiles[3])
    g_idx, g_cnt = bsa_ext.select_blocks(q, k, lq, lk, cq, ck, *sel, backend=backend)
    ref, pt, single = _truth(case, q, k, v, dout, g_idx, g_cnt, backend)
    lat = [lq, lq, lk, lk]
    cut = lambda xs: [tile_of_rank(x, la, split, rank) for x, la in zip(xs, lat)]  # noqa: E731
    floor = 1e-6 if q.dtype == torch.float64 else 1e-5
    _compare(case["name"], [out, qs.grad, ks.grad, vs.grad], cut(ref), cut(pt), cut(single), floor)
    return {"in_place": ulysses_chunks_match(lq, cq, split) and ulysses_chunks_match(lk, ck, split)}


def run_cases(rank, world, dist_backend, init_method, which, result_dir=None, names=None):
    """Run every case of ``CASES[which]``; returns {name: "ok" | traceback} and writes it to ``result_dir``."""
    device = "cpu"
    if dist_backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = f"cuda:{torch.cuda.current_device()}"
    dist.init_process_group(dist_backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(1)
    # Unfetched buffer rows become NaN: any read of a chunk that was not sent shows up in the outputs.
    sparse_cp._BUFFER_FILL = float("nan")
    backend = "torch" if device == "cpu" else "auto"
    subgroup = dist.new_group(list(range(world)))
    results = {}
    for case in CASES[which]:
        if names and case["name"] not in names:
            continue
        try:
            runner = run_ulysses if case.get("kind") == "ulysses" else run_sparse
            # A process group of its own (here: the same ranks) exercises the group-rank to
            # global-rank mapping of the point-to-point exchange.
            info = runner(case, rank, world, device, backend, group=subgroup if case.get("subgroup") else None)
            results[case["name"]] = {"status": "ok", **info}
        except Exception:  # noqa: BLE001  (reported per case; the other cases still run)
            results[case["name"]] = {"status": "failed", "error": traceback.format_exc()}
        dist.barrier()
    dist.destroy_process_group()
    if result_dir is not None:
        with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="bsa_ext distributed checks (run under torchrun)")
    parser.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    args = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    which = "gpu" if args.backend == "nccl" else "cpu"
    results = run_cases(rank, world, args.backend, "env://", which, names=args.cases.split(",") if args.cases else None)
    failed = 0
    for name, res in results.items():
        failed += res["status"] != "ok"
        line = f"[rank {rank}] {name}: {res['status']}"
        extra = {k: v for k, v in res.items() if k not in ("status", "error")}
        if extra:
            line += f" {extra}"
        print(line + ("\n" + res["error"] if res["status"] != "ok" else ""), flush=True)
    if rank == 0 and which == "gpu":
        print(f"GPUs: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
