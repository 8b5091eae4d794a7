"""Runs the selection kernels once per kernel variant on tiny rows, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tools/device/sanitize_select.py
Key block counts reach every register-width variant of the chooser and the wide fallback.
"""

import torch

import bsa_ext  # noqa: F401  (loads the kernels)
from bsa_ext.layout import ChunkGeometry, selection_width, topk_count


def main():
    torch.manual_seed(0)
    gq = ChunkGeometry((3, 5, 9), (2, 2, 4))
    for nk in (5, 300, 800, 1400, 2900, 4100):
        gk = ChunkGeometry((1, 1, 4 * nk - 2), (1, 1, 4))
        for dtype, D in ((torch.bfloat16, 128), (torch.float16, 64)):
            q = torch.randn(1, 1, gq.seq_len, D, device="cuda").to(dtype)
            k = torch.randn(1, 1, gk.seq_len, D, device="cuda").to(dtype)
            for sparsity, cdf in ((0.9, None), (0.5, 0.9), (None, 0.8)):
                width = selection_width(gk.num_blocks, sparsity, cdf, None)
                topk = topk_count(gk.num_blocks, sparsity) if sparsity is not None else 0
                idx, cnt = torch.ops.bsa.cuda_select_blocks(
                    q, k, gq.as_ints(), gk.as_ints(), topk, -1.0 if cdf is None else cdf, width
                )
                assert int(cnt.min()) >= 1 and int(cnt.max()) <= width
    torch.cuda.synchronize()
    print("sanitize_select: ok")


if __name__ == "__main__":
    main()
