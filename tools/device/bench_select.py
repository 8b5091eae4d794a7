"""Times torch.ops.bsa.cuda_select_blocks on the SPEC workloads (do_bench medians).

    python tools/device/bench_select.py --label new [--profile] [--save DIR]
Prints one JSON line per workload; --profile adds a per-kernel table for W720s; --save writes
each workload's indices and counts (seeded inputs) to DIR/<label>_<workload>.pt, so that two
builds' selections can be compared with --compare DIR/a DIR/b... (see main).
"""

import argparse
import json

import torch
import triton.testing

import bsa_ext  # noqa: F401  (loads the kernels)
from bsa_ext.layout import ChunkGeometry, selection_width, topk_count
from bsa_ext.workloads import WORKLOADS

NAMES = ("W720s", "W720", "W720s-cdf", "W720s-c128")  # the SPEC workloads with a forward-only selection


def selection_inputs(name, H=32, D=128):
    """Seeded q, k (strided views of one qkv tensor) of a SPEC workload and the arguments of
    cuda_select_blocks after them: (q, k, geometry ints, K, cdf threshold or -1, width)."""
    w = WORKLOADS[name]
    sparsity, cdf = w.sparsity, w.cdf_threshold
    g = ChunkGeometry(w.latent, w.chunk)
    torch.manual_seed(0)
    qkv = torch.randn(1, g.seq_len, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, 0].permute(0, 2, 1, 3), qkv[:, :, 1].permute(0, 2, 1, 3)
    topk, width = topk_count(g.num_blocks, sparsity), selection_width(g.num_blocks, sparsity, cdf, None)
    return q, k, g.as_ints(), topk, -1.0 if cdf is None else cdf, width


def make_call(name, H=32, D=128):
    q, k, gi, topk, cdf, width = selection_inputs(name, H, D)
    return lambda: torch.ops.bsa.cuda_select_blocks(q, k, gi, gi, topk, cdf, width)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="new")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--save", default=None, help="directory for each workload's indices and counts")
    ap.add_argument("--compare", nargs=2, default=None, metavar=("LABEL_A", "LABEL_B"),
                    help="with --save: compare two labels' saved selections as sets, then exit")
    args = ap.parse_args()
    if args.compare:
        for name in NAMES:
            a, b = (torch.load(f"{args.save}/{lbl}_{name}.pt") for lbl in args.compare)
            same_counts = torch.equal(a["counts"], b["counts"])
            live = torch.arange(a["indices"].shape[-1]) < a["counts"][..., None]
            sa = torch.where(live, a["indices"], -1).sort(-1).values
            sb = torch.where(live, b["indices"], -1).sort(-1).values
            print(json.dumps({"workload": name, "counts_equal": same_counts, "rows_differing": int((sa != sb).any(-1).sum())}))
        return
    gpu = torch.cuda.get_device_name()
    for name in NAMES:
        call = make_call(name)
        call()
        torch.cuda.synchronize()
        if args.save:
            indices, counts = call()
            torch.save({"indices": indices.cpu(), "counts": counts.cpu()}, f"{args.save}/{args.label}_{name}.pt")
        ms = triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median")
        print(json.dumps({"workload": name, "op": "select", "impl": "cuda", "label": args.label, "ms": round(ms, 4), "gpu": gpu}))
        if args.profile and name == "W720s":
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    call()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))
        del call
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
