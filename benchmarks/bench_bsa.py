"""Benchmark the SPEC §6 workloads: bsa_ext backends against dense SDPA, same process.

    python benchmarks/bench_bsa.py [--workloads W720s,W720,...] [--impls cuda,triton,...]

Reports per workload and implementation: median ms (triton.testing.do_bench), effective
TFLOP/s over computed blocks only (4*B*H*Sq*keys*D forward, x2.5 backward), speedup over
dense cuDNN / flash SDPA, peak extra memory. Prints a table last and appends JSON lines
to <out-dir>/<gpu>.jsonl (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys

import torch
import torch.nn.functional as F

import bsa_ext
from bsa_ext.layout import ChunkGeometry, attention_flops
from bsa_ext.ops import resolve_backend
from bsa_ext.workloads import WORKLOADS, append_results, make_inputs, measured_commit

BSA_IMPLS = ("cuda", "triton")
DENSE_IMPLS = ("dense_cudnn", "dense_flash")


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=100, rep=500, return_mode="median")


def _peak_extra_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _runs(impl, op, w, q, gq, gk) -> bool:
    try:
        resolve_backend(impl, op, q, gq, gk)
        return True
    except bsa_ext.BackendUnavailableError as exc:
        print(f"  [{w.name}] {impl} {op}: skipped ({exc})", file=sys.stderr)
        return False


def bench_workload(w, impls, rows, meta):
    q, k, v = make_inputs(w)
    gq = gk = ChunkGeometry(w.latent, w.chunk)
    args = (w.latent, w.latent, w.chunk, w.chunk)
    dout = torch.randn_like(q)

    def record(op, impl, ms, flops, peak):
        rows.append(dict(workload=w.name, op=op, impl=impl, ms=ms, tflops=None if flops is None else flops / ms / 1e9,
                         peak_extra_mib=peak, **meta))

    dense_flops = attention_flops(w.batch, w.heads, gq.seq_len, gk.seq_len, w.head_dim)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for impl in impls:
        if impl not in DENSE_IMPLS:
            continue
        backend = SDPBackend.CUDNN_ATTENTION if impl == "dense_cudnn" else SDPBackend.FLASH_ATTENTION
        try:
            with sdpa_kernel(backend):
                fwd = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
                record("forward", impl, _bench(fwd), dense_flops, _peak_extra_mib(fwd))
                if w.backward:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def fb():
                        # Gradients returned, not accumulated into .grad: in a model q, k and v
                        # are activations, and an accumulation would add a pass over each.
                        torch.autograd.grad(F.scaled_dot_product_attention(qg, kg, vg), (qg, kg, vg), dout)

                    record("fwd_bwd", impl, _bench(fb), 3.5 * dense_flops, _peak_extra_mib(fb))
        except RuntimeError as exc:
            print(f"  [{w.name}] {impl}: unavailable ({str(exc).splitlines()[0]})", file=sys.stderr)

    # One set of block lists for every forward, so implementations compare on identical work.
    indices, counts = bsa_ext.select_blocks(q, k, *args, w.sparsity, w.cdf_threshold, backend="auto")
    keys = counts.double().mean().item() * gk.capacity
    flops = attention_flops(w.batch, w.heads, gq.seq_len, keys, w.head_dim)
    for impl in impls:
        if impl not in BSA_IMPLS:
            continue
        if _runs(impl, "select", w, q, gq, gk):
            sel = lambda: bsa_ext.select_blocks(q, k, *args, w.sparsity, w.cdf_threshold, backend=impl)  # noqa: E731
            record("select", impl, _bench(sel), None, _peak_extra_mib(sel))
        if _runs(impl, "forward", w, q, gq, gk):
            fwd = lambda: bsa_ext.block_sparse_attention(q, k, v, indices, counts, *args, backend=impl)  # noqa: E731
            record("forward", impl, _bench(fwd), flops, _peak_extra_mib(fwd))
        if _runs(impl, "select", w, q, gq, gk) and _runs(impl, "forward", w, q, gq, gk):
            tot = lambda: bsa_ext.flash_attn_bsa_3d(q, k, v, *args[:2], w.sparsity, w.cdf_threshold, *args[2:], backend=impl)  # noqa: E731
            record("total", impl, _bench(tot), flops, _peak_extra_mib(tot))
        if w.backward and _runs(impl, "backward", w, q, gq, gk):
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            out = bsa_ext.block_sparse_attention(qg, kg, vg, indices, counts, *args, backend=impl)

            def bwd():
                torch.autograd.grad(out, (qg, kg, vg), dout, retain_graph=True)

            record("backward", impl, _bench(bwd), 2.5 * flops, _peak_extra_mib(bwd))

            def fb():
                o = bsa_ext.flash_attn_bsa_3d(qg, kg, vg, *args[:2], w.sparsity, w.cdf_threshold, *args[2:], backend=impl)
                torch.autograd.grad(o, (qg, kg, vg), dout)  # returned, not accumulated (as for dense)

            record("fwd_bwd", impl, _bench(fb), 3.5 * flops, _peak_extra_mib(fb))
    return counts.double().mean().item() / gk.num_blocks


def print_table(rows, densities):
    """Ratios compare like with like: forward and total (select + forward) rows with dense
    forward, fwd_bwd with dense fwd_bwd (no dense backward alone is timed), and every bsa
    row with the Triton row of the same workload and op."""
    ms = {(r["workload"], r["op"], r["impl"]): r["ms"] for r in rows}
    print(f"\n{'workload':12s}{'op':10s}{'impl':13s}{'ms':>9s}{'TFLOP/s':>9s}{'x cuDNN':>9s}{'x flash':>9s}{'x triton':>9s}{'MiB':>9s}")
    for r in rows:
        dense_op = "forward" if r["op"] == "total" else r["op"]
        refs = [ms.get((r["workload"], dense_op, d)) for d in DENSE_IMPLS] + [ms.get((r["workload"], r["op"], "triton"))]
        cells = []
        for i, ref in enumerate(refs):
            comparable = r["impl"] not in DENSE_IMPLS and (i < len(DENSE_IMPLS) or r["impl"] != "triton")
            cells.append(f"{ref / r['ms']:9.2f}" if ref and comparable else f"{'':9s}")
        tf = f"{r['tflops']:9.1f}" if r["tflops"] is not None else f"{'':9s}"
        print(f"{r['workload']:12s}{r['op']:10s}{r['impl']:13s}{r['ms']:9.3f}{tf}{''.join(cells)}{r['peak_extra_mib']:9.0f}")
    for name, d in densities.items():
        print(f"{name}: selected density {d:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W720s,W720,W720s-c128,W720s-cdf,T16-train")
    parser.add_argument("--impls", default=",".join(BSA_IMPLS + DENSE_IMPLS))
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--backward", action="store_true", help="also time backward / fwd_bwd on every workload")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_bsa: needs a CUDA GPU (the numbers are meaningless on a CPU)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name()
    meta = dict(gpu=gpu, torch=torch.__version__, commit=measured_commit(), date=datetime.date.today().isoformat(), world_size=1)
    if os.environ.get("BSA_DISABLE_SM90"):  # the cuda rows then come from the sm80 kernels, on any GPU
        meta["cuda_kernels"] = "sm80 family (BSA_DISABLE_SM90=1)"
    impls = args.impls.split(",")
    rows, densities = [], {}
    for name in args.workloads.split(","):
        w = WORKLOADS[name]
        densities[name] = bench_workload(dataclasses.replace(w, backward=True) if args.backward else w, impls, rows, meta)
        torch.cuda.empty_cache()
    path = append_results(rows, args.out_dir, gpu)
    print(f"GPU: {gpu}; results appended to {path}")
    print_table(rows, densities)
    return 0


if __name__ == "__main__":
    sys.exit(main())
