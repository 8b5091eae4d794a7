"""Times the CUDA selection and forward kernels at the SPEC §6 shapes against dense SDPA.

    python tools/device/time_kernels.py [W720s W720s-c128 W720]
Prints one line per measurement (median ms of triton.testing.do_bench) and writes JSON
lines to $OUT/timings.jsonl when OUT is set. Dense baselines run in the same process.
"""

import json
import os
import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import bsa_ext  # noqa: F401
from bsa_ext.layout import ChunkGeometry, topk_count
from bsa_ext.workloads import WORKLOADS


def bench(fn, reps=50):
    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")


def main(names):
    gpu = torch.cuda.get_device_name()
    out_path = os.path.join(os.environ["OUT"], "timings.jsonl") if os.environ.get("OUT") else None
    rows = []
    for name in names:
        w = WORKLOADS[name]
        sparsity, cdf = w.sparsity, w.cdf_threshold
        g = ChunkGeometry(w.latent, w.chunk)
        B, H, D, S = 1, 32, 128, g.seq_len
        qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
        K = topk_count(g.num_blocks, sparsity)
        gi = g.as_ints()
        width = K if cdf is None else g.num_blocks
        thr = -1.0 if cdf is None else cdf
        select = lambda: torch.ops.bsa.cuda_select_blocks(q, k, gi, gi, K, thr, width)  # noqa: E731
        idx, cnt = select()
        forward = lambda: torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, gi, gi, D**-0.5)  # noqa: E731
        # Effective FLOPs over computed blocks: mean selected blocks per query block.
        flops = 4.0 * B * H * S * (cnt.double().mean().item() * g.capacity) * D
        ms_sel = bench(select)
        ms_fwd = bench(forward)
        rows.append((name, "select", "cuda", ms_sel, None))
        rows.append((name, "forward", "cuda", ms_fwd, flops / ms_fwd / 1e9))
        if name in ("W720s", "W720s-c128"):
            qc, kc, vc = (x.contiguous() for x in (q, k, v))
            dense_flops = 4.0 * B * H * S * S * D
            for backend, label in [(SDPBackend.CUDNN_ATTENTION, "dense_cudnn"), (SDPBackend.FLASH_ATTENTION, "dense_flash")]:
                try:
                    with sdpa_kernel(backend):
                        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qc, kc, vc)  # noqa: E731
                        ms = bench(fn, reps=5)
                    rows.append((name, "forward", label, ms, dense_flops / ms / 1e9))
                except RuntimeError as exc:
                    print(f"{label}: {exc}")
            del qc, kc, vc
        del qkv, q, k, v, idx, cnt
        torch.cuda.empty_cache()
    print(f"GPU: {gpu}")
    print(f"{'workload':<12} {'op':<8} {'impl':<12} {'ms':>9} {'TFLOP/s':>8}")
    for name, op, impl, ms, tf in rows:
        print(f"{name:<12} {op:<8} {impl:<12} {ms:9.3f} {'' if tf is None else f'{tf:8.1f}'}")
        if out_path:
            with open(out_path, "a") as f:
                f.write(json.dumps({"workload": name, "op": op, "impl": impl, "ms": ms, "tflops": tf, "gpu": gpu}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["W720s", "W720s-c128", "W720"])
