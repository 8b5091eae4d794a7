"""Times the parts of the CUDA top-k selection at a SPEC workload (default W720s).

    python tools/device/select_parts.py [W720s] [--once] [--label L] [--select-only]
Prints do_bench medians of: the whole selection (cuda_select_blocks), the pooling alone
(cuda_pool_blocks of q and of k) and the ranking alone (cuda_select_pooled on those pooled
blocks, the two-launch fused path). ``--once`` runs each op once and exits: a target for ncu.
"""

import json
import os
import sys

import torch
import triton.testing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_select import selection_inputs  # noqa: E402  (also loads the kernels)
from bsa_ext.workloads import WORKLOADS  # noqa: E402


def main(argv):
    name = next((a for a in argv if not a.startswith("--") and a in WORKLOADS), "W720s")
    label = argv[argv.index("--label") + 1] if "--label" in argv else "build"
    q, k, gi, topk, cdf, width = selection_inputs(name)
    ops = torch.ops.bsa
    whole = lambda: ops.cuda_select_blocks(q, k, gi, gi, topk, cdf, width)  # noqa: E731
    pool = lambda: (ops.cuda_pool_blocks(q, gi), ops.cuda_pool_blocks(k, gi))  # noqa: E731
    qp, kp = pool()
    rank = lambda: ops.cuda_select_pooled(qp, kp, topk, cdf, width)  # noqa: E731
    for f in (whole, pool, rank):
        f()
    torch.cuda.synchronize()
    if "--once" in argv:
        return
    a, b = whole(), rank()
    same = bool(torch.equal(a[1], b[1]) and torch.equal(a[0].sort(-1).values, b[0].sort(-1).values))
    parts = (("select", whole),) if "--select-only" in argv else (("select", whole), ("pool", pool), ("rank", rank))
    for part, f in parts:
        ms = triton.testing.do_bench(f, warmup=50, rep=300, return_mode="median")
        print(json.dumps({"workload": name, "part": part, "label": label, "ms": round(ms, 4),
                          "gpu": torch.cuda.get_device_name(), "rank_equals_select": same}))


if __name__ == "__main__":
    main(sys.argv[1:])
