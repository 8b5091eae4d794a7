"""Times torch.ops.bsa.cuda_select_blocks on the SPEC workloads (do_bench medians).

    python tools/device/bench_select.py --label new [--profile]
Prints one JSON line per workload; --profile adds a per-kernel table for W720s.
"""

import argparse
import json

import torch
import triton.testing

import bsa_ext  # noqa: F401  (loads the kernels)
from bsa_ext.layout import ChunkGeometry, selection_width, topk_count
from bsa_ext.workloads import WORKLOADS

NAMES = ("W720s", "W720", "W720s-cdf", "W720s-c128")  # the SPEC workloads with a forward-only selection


def make_call(name, H=32, D=128):
    w = WORKLOADS[name]
    sparsity, cdf = w.sparsity, w.cdf_threshold
    g = ChunkGeometry(w.latent, w.chunk)
    qkv = torch.randn(1, g.seq_len, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, 0].permute(0, 2, 1, 3), qkv[:, :, 1].permute(0, 2, 1, 3)
    topk, width = topk_count(g.num_blocks, sparsity), selection_width(g.num_blocks, sparsity, cdf, None)
    gi = g.as_ints()
    return lambda: torch.ops.bsa.cuda_select_blocks(q, k, gi, gi, topk, -1.0 if cdf is None else cdf, width)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="new")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    for name in NAMES:
        call = make_call(name)
        call()
        torch.cuda.synchronize()
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
