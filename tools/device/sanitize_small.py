"""Runs every CUDA kernel once on tiny shapes, for compute-sanitizer (memcheck / racecheck).

    compute-sanitizer --tool memcheck python tools/device/sanitize_small.py
Covers partial edge chunks, Sq != Sk, q/k capacities 64/128 (every forward variant of the
Hopper kernel), zero counts, garbage ids and the cdf path, forward and backward; exits non-zero if a result is not finite.
"""

import torch

import bsa_ext  # noqa: F401  (loads the kernels)
from bsa_ext.layout import ChunkGeometry, selection_width, topk_count


def _backward(q, k, v, out, lse, idx, cnt, gq, gk, D):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("bsa::cuda_backward", "CUDA"):
        return
    dout = torch.randn_like(out)
    grads = torch.ops.bsa.cuda_backward(dout, q, k, v, out, lse, idx, cnt, gq.as_ints(), gk.as_ints(), D**-0.5)
    assert all(torch.isfinite(g).all() for g in grads)


def main():
    torch.manual_seed(0)
    # The 64/64 cases run the three-consumer Hopper forward with 8 query blocks (a CTA of two).
    cases = [
        (torch.bfloat16, 128, (4, 4, 4), (4, 4, 8), (5, 6, 9)),
        (torch.float16, 64, (4, 4, 8), (4, 4, 4), (5, 6, 9)),
        (torch.bfloat16, 128, (4, 4, 4), (4, 4, 4), (5, 6, 5)),
        (torch.float16, 64, (4, 4, 4), (4, 4, 4), (5, 6, 5)),
    ]
    for dtype, D, cq, ck, latent_q in cases:
        gq, gk = ChunkGeometry(latent_q, cq), ChunkGeometry((6, 7, 5), ck)
        q = torch.randn(1, 2, gq.seq_len, D).to(dtype).cuda()
        k = torch.randn(1, 2, gk.seq_len, D).to(dtype).cuda()
        v = torch.randn(1, 2, gk.seq_len, D).to(dtype).cuda()
        for sparsity, cdf in [(0.5, None), (0.5, 0.9), (None, 0.8)]:
            width = selection_width(gk.num_blocks, sparsity, cdf, None)
            topk = topk_count(gk.num_blocks, sparsity) if sparsity is not None else 0
            idx, cnt = torch.ops.bsa.cuda_select_blocks(
                q, k, gq.as_ints(), gk.as_ints(), topk, -1.0 if cdf is None else cdf, width
            )
            out, lse = torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, gq.as_ints(), gk.as_ints(), D**-0.5)
            assert torch.isfinite(out).all()
            _backward(q, k, v, out, lse, idx, cnt, gq, gk, D)
        nk = gk.num_blocks
        garbage = torch.tensor([-1, nk, 2**31 - 1, 0, nk - 1], dtype=torch.int32)
        idx = garbage.expand(1, 2, gq.num_blocks, 5).contiguous().cuda()
        cnt = torch.tensor([0, 3, 5, 99, -4] * gq.num_blocks, dtype=torch.int32)[: 2 * gq.num_blocks]
        cnt = cnt.view(1, 2, gq.num_blocks).contiguous().cuda()
        out, lse = torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, gq.as_ints(), gk.as_ints(), D**-0.5)
        assert torch.isfinite(out).all()
        _backward(q, k, v, out, lse, idx, cnt, gq, gk, D)
    torch.cuda.synchronize()
    print("sanitize_small: ok")


if __name__ == "__main__":
    main()
