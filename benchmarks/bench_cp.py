"""Sparse context parallelism on W720 (T=48, S=168,960): 1 GPU vs N GPUs.

    torchrun --nproc_per_node=2 benchmarks/bench_cp.py [--workload W720] [--iters 10]
    python benchmarks/bench_cp.py            # one GPU: the baseline alone

Every rank builds the same video-like inputs, times the single-GPU layer on its own GPU
(selection + attention, ``bsa_ext.flash_attn_bsa_3d``; and forward + backward), then the
sparse context-parallel layer on its shard (``sparse_cp_flash_attn_bsa_3d``). Times are
medians of CUDA-event timings over a fixed number of iterations (``do_bench`` picks its
own count per rank, which would deadlock the collectives), the slowest rank's median
counts. Bytes: what each rank received (pooled keys, request masks, K/V rows) against a
dense ring, which brings every K/V token a rank does not own. Prints a table last and
appends JSON lines (with ``world_size``) to benchmarks/results/<gpu>.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.distributed as dist

import bsa_ext
from bsa_ext.distributed import ChunkShards, dense_ring_bytes, sparse_cp_flash_attn_bsa_3d
from bsa_ext.layout import ChunkGeometry, attention_flops, topk_count
from bsa_ext.workloads import WORKLOADS, append_results, make_inputs, measured_commit


def _time(fn, iters: int, warmup: int, world: int) -> float:
    """Median ms over ``iters`` calls (same count on every rank), max over ranks."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    if world > 1:
        dist.barrier()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    ms = torch.tensor([statistics.median(times)], device="cuda")
    if world > 1:
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    return ms.item()


def _max_over_ranks(value: int, world: int) -> int:
    t = torch.tensor([value], device="cuda", dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _profile(fn, rank: int, trace_dir=None) -> None:
    """Two calls of ``fn`` under the torch profiler on every rank (collectives must match); rank 0
    prints. With ``trace_dir`` every rank writes its chrome trace there (rank<r>.json)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
    if trace_dir:
        os.makedirs(trace_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(trace_dir, f"rank{rank}.json"))
    if rank == 0:
        for key in ("cuda_time_total", "cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W720")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--no-overlap", action="store_true", help="fetch first, then one attention call")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-backward", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print rank 0's profile of two sparse-CP forwards")
    parser.add_argument("--trace-dir", default=None, help="with --profile: every rank's chrome trace goes here")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cp: needs CUDA GPUs", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if world > 1:
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    w = WORKLOADS[args.workload]
    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, commit=measured_commit(), date=datetime.date.today().isoformat())
    geom = ChunkGeometry(w.latent, w.chunk)
    keys = topk_count(geom.num_blocks, w.sparsity) * geom.capacity if w.cdf_threshold is None else None
    flops = attention_flops(w.batch, w.heads, geom.seq_len, keys, w.head_dim) if keys else None
    sel = (w.sparsity, w.cdf_threshold)
    rows = []

    def record(op, path, ws, ms, impl, **extra):
        tf = None if flops is None else (flops * (3.5 if op == "fwd_bwd" else 1.0)) / ms / 1e9
        rows.append(dict(workload=w.name, op=op, impl=impl, path=path, ms=ms, tflops=tf, peak_extra_mib=None,
                         world_size=ws, **meta, **extra))

    q, k, v = make_inputs(w)
    dout = torch.randn_like(q)
    args_full = (w.latent, w.latent, *sel, w.chunk, w.chunk)
    if not args.skip_baseline:
        ms = _time(lambda: bsa_ext.flash_attn_bsa_3d(q, k, v, *args_full, backend=args.backend), args.iters, args.warmup, world)
        record("total", "single", 1, ms, bsa_ext.last_backend("forward"))
        if not args.skip_backward:
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
            # Gradients returned, not accumulated into .grad (which would add a kernel per call).
            fb = lambda: torch.autograd.grad(  # noqa: E731
                bsa_ext.flash_attn_bsa_3d(qg, kg, vg, *args_full, backend=args.backend), (qg, kg, vg), dout)
            record("fwd_bwd", "single", 1, _time(fb, args.iters, args.warmup, world), bsa_ext.last_backend("backward"))
            del qg, kg, vg
    if world > 1:
        shards = ChunkShards.split(w.latent, w.chunk, world)
        qs, ks, vs, ds = (shards.shard(x, rank).contiguous() for x in (q, k, v, dout))
        del q, k, v, dout
        torch.cuda.empty_cache()
        overlap = not args.no_overlap
        cp = lambda qq, kk, vv, st=None: sparse_cp_flash_attn_bsa_3d(  # noqa: E731
            qq, kk, vv, *args_full, backend=args.backend, overlap=overlap, stats=st
        )
        stats: dict = {}
        cp(qs, ks, vs, stats)
        ring = dense_ring_bytes(shards, rank, w.batch, w.heads, w.head_dim, ks.element_size())
        received = {key: _max_over_ranks(val, world) for key, val in stats.items()}
        ring = _max_over_ranks(ring, world)
        fwd_bytes = sum(received.get(key, 0) for key in ("pooled_keys", "requests", "kv"))
        ms = _time(lambda: cp(qs, ks, vs), args.iters, args.warmup, world)
        record("total", "sparse_cp", world, ms, bsa_ext.last_backend("forward"), bytes_received=fwd_bytes,
               dense_ring_bytes=ring, overlap=overlap, **{f"bytes_{key}": val for key, val in received.items()})
        if args.profile:
            _profile(lambda: cp(qs, ks, vs), rank, args.trace_dir)
        if not args.skip_backward:
            qg, kg, vg = (x.detach().requires_grad_() for x in (qs, ks, vs))
            bstats: dict = {}
            torch.autograd.grad(cp(qg, kg, vg, bstats), (qg, kg, vg), ds)
            grad_bytes = _max_over_ranks(bstats.get("grad_kv", 0), world)
            fb = lambda: torch.autograd.grad(cp(qg, kg, vg), (qg, kg, vg), ds)  # noqa: E731
            record("fwd_bwd", "sparse_cp", world, _time(fb, args.iters, args.warmup, world), bsa_ext.last_backend("backward"),
                   bytes_received=fwd_bytes + grad_bytes, dense_ring_bytes=2 * ring, overlap=overlap)
    if rank == 0:
        path = append_results(rows, args.out_dir, gpu)
        print(f"GPU: {gpu} x {world}; results appended to {path}")
        single = {r["op"]: r["ms"] for r in rows if r["path"] == "single"}
        print(f"\n{'workload':10s}{'op':9s}{'path':11s}{'GPUs':>5s}{'ms':>10s}{'speedup':>9s}{'MB recv':>10s}{'x ring':>8s}")
        for r in rows:
            speed = f"{single[r['op']] / r['ms']:9.2f}" if r["op"] in single else f"{'':9s}"
            mb = f"{r['bytes_received'] / 1e6:10.1f}" if "bytes_received" in r else f"{'':10s}"
            ratio = f"{r['bytes_received'] / r['dense_ring_bytes']:8.3f}" if r.get("dense_ring_bytes") else f"{'':8s}"
            print(f"{r['workload']:10s}{r['op']:9s}{r['path']:11s}{r['world_size']:5d}{r['ms']:10.2f}{speed}{mb}{ratio}")
        print("(x ring: bytes received by the busiest rank / what a dense ring brings it; fwd_bwd counts dK/dV too)")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
