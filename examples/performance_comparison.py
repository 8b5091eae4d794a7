"""Dense SDPA vs BSA per preset on one shape; a quick look (the full study: python -m bsa_ext bench).

    python examples/performance_comparison.py                       # CPU, small
    python examples/performance_comparison.py --device cuda --latent 24,44,80 --heads 32 --head-dim 128
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import bsa_ext
from bsa_ext.presets import get_preset, preset_names
from bsa_ext.tuning import make_inputs, rel_err


def timer(device):
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", default="8,16,16")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    latent = tuple(int(x) for x in args.latent.split(","))
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    q, k, v = make_inputs(args.heads, latent, args.head_dim, dtype, args.device)
    bench = timer(args.device)
    dense_ms = bench(lambda: F.scaled_dot_product_attention(q, k, v))
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    print(f"latent {latent}, H={args.heads}, D={args.head_dim}, {dtype}: dense SDPA {dense_ms:.2f} ms")
    print(f"{'preset':<14} {'ms':>8} {'speedup':>8} {'rel.err':>8}")
    for name in preset_names():
        preset = get_preset(name)
        if not preset.enable_bsa:
            continue
        run = lambda: bsa_ext.flash_attn_bsa_3d(q, k, v, latent, latent, **preset.params())  # noqa: E731
        ms = bench(run)
        print(f"{name:<14} {ms:8.2f} {dense_ms / ms:7.2f}x {rel_err(run(), dense):8.4f}")
    print("(on CPU the PyTorch reference path runs: correct, not fast; speed needs a GPU)")


if __name__ == "__main__":
    main()
