"""Forward TFLOP/s at W720s for index lists of different L2 locality, beside dense SDPA.

    python tools/device/fwd_lists.py [--sm80] [--reps N] [--k K] [--patterns a,b,...] [--no-dense]

Patterns (every row counts K blocks, 82 unless --k says otherwise; ids ascending):
  selected  the top-K selection of random q, k (what the benchmark times at K = 82)
  random    K ids drawn uniformly from all 1,320 blocks of the head
  window    K ids drawn from 2K blocks of the head (at K = 82, 5 MB of K/V: L2-resident)
  local     the K ids nearest the query block's own id (neighbours share most of them)
  same      ids 0..K-1 for every query block
A longer list per query block (--k) shows what each CTA's start and end cost.
With --sm80 the sm80 kernels run (BSA_DISABLE_SM90=1), else the build's choice. The dense
rows (FlashAttention-2 through SDPA's flash backend, and cuDNN) run in the same process, so
the ratio between rows holds on a shared machine where absolute times may not.
"""

import os
import sys

import torch
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import bsa_ext  # noqa: F401
from bsa_ext.layout import ChunkGeometry, topk_count


PATTERNS = ["selected", "random", "window", "local", "same"]


def lists(pattern, nq, nk, K, H, q, k, gi):
    gen = torch.Generator(device="cuda").manual_seed(0)
    if pattern == "selected":
        idx, _ = torch.ops.bsa.cuda_select_blocks(q, k, gi, gi, K, -1.0, K)
        return idx
    if pattern == "random":
        ids = torch.rand(H, nq, nk, device="cuda", generator=gen).argsort(-1)[..., :K]
    elif pattern == "window":
        ids = torch.rand(H, nq, min(nk, 2 * K), device="cuda", generator=gen).argsort(-1)[..., :K]
    elif pattern == "local":
        start = (torch.arange(nq, device="cuda") - K // 2).clamp(0, nk - K)
        ids = (start[:, None] + torch.arange(K, device="cuda")).expand(H, nq, K)
    elif pattern == "same":
        ids = torch.arange(K, device="cuda").expand(H, nq, K)
    else:
        raise ValueError(f"pattern: expected selected/random/window/local/same, got {pattern!r}")
    return ids.sort(-1).values.to(torch.int32).unsqueeze(0).contiguous()


def main(argv):
    if "--sm80" in argv:
        os.environ["BSA_DISABLE_SM90"] = "1"
    reps = int(argv[argv.index("--reps") + 1]) if "--reps" in argv else 100
    g = ChunkGeometry((24, 44, 80), (4, 4, 4))
    B, H, D, S = 1, 32, 128, g.seq_len
    nq = nk = g.num_blocks
    K = int(argv[argv.index("--k") + 1]) if "--k" in argv else topk_count(nk, 0.9375)
    gi = g.as_ints()
    patterns = argv[argv.index("--patterns") + 1].split(",") if "--patterns" in argv else PATTERNS
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    cnt = torch.full((B, H, nq), K, dtype=torch.int32, device="cuda")
    flops = 4.0 * B * H * S * K * g.capacity * D
    kernels = "sm80 (BSA_DISABLE_SM90=1)" if "--sm80" in argv else "build's choice"
    print(f"GPU: {torch.cuda.get_device_name()}, W720s, K = {K}, kernels: {kernels}")
    for pattern in patterns:
        idx = lists(pattern, nq, nk, K, H, q, k, gi)
        fn = lambda: torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, gi, gi, D**-0.5)  # noqa: E731
        ms = triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median")
        print(f"  {pattern:<9} {ms:8.3f} ms  {flops / ms / 1e9:6.1f} TFLOP/s")
    if "--no-dense" in argv:
        return
    qc, kc, vc = (x.contiguous() for x in (q, k, v))
    dense = 4.0 * B * H * S * S * D
    for backend, label in [(SDPBackend.FLASH_ATTENTION, "dense flash"), (SDPBackend.CUDNN_ATTENTION, "dense cudnn")]:
        with sdpa_kernel(backend):
            fn = lambda: torch.nn.functional.scaled_dot_product_attention(qc, kc, vc)  # noqa: E731
            ms = triton.testing.do_bench(fn, warmup=1, rep=5, return_mode="median")
        print(f"  {label:<9} {ms:8.3f} ms  {dense / ms / 1e9:6.1f} TFLOP/s")


if __name__ == "__main__":
    main(sys.argv[1:])
