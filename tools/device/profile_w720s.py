"""One select + one forward at W720s, for ncu / torch.profiler (per-kernel times).

    python tools/device/profile_w720s.py            # prints a per-kernel CUDA time table
    ncu --kernel-name regex:forward_kernel python tools/device/profile_w720s.py --once
"""

import sys

import torch

import bsa_ext  # noqa: F401
from bsa_ext.layout import ChunkGeometry, topk_count


def main(once):
    g = ChunkGeometry((24, 44, 80), (4, 4, 4))
    B, H, D, S = 1, 32, 128, g.seq_len
    qkv = torch.randn(B, S, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    K, gi = topk_count(g.num_blocks, 0.9375), g.as_ints()

    def step():
        idx, cnt = torch.ops.bsa.cuda_select_blocks(q, k, gi, gi, K, -1.0, K)
        return torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, gi, gi, D**-0.5)

    step()
    torch.cuda.synchronize()
    if once:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=70))


if __name__ == "__main__":
    main("--once" in sys.argv)
