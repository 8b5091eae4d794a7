"""Test utilities: the FlashAttention tolerance rule and input makers."""

from __future__ import annotations

import pytest
import torch

from bsa_ext import reference
from bsa_ext.layout import ChunkGeometry


def assert_close_rule(out, ref, pt, name="out", floor=1e-5):
    """FlashAttention's rule: max|out-ref| <= 2 * max|pt-ref| + floor (ref in fp64, pt in out's dtype)."""
    out, ref, pt = out.double(), ref.double(), pt.double()
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out - ref).abs().max().item()
    bound = 2 * (pt - ref).abs().max().item() + floor * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


def make_qkv(B, H, Sq, Sk, D, dtype, device, scale=1.0, fused=False):
    """Random q, k, v; ``fused`` makes them strided views of one [B, S, 3, H, D] tensor."""
    if fused:
        assert Sq == Sk
        qkv = torch.randn(B, Sq, 3, H, D, device=device, dtype=torch.float32).mul(scale).to(dtype)
        return tuple(qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    q = torch.randn(B, H, Sq, D, device=device).mul(scale).to(dtype)
    k = torch.randn(B, H, Sk, D, device=device).mul(scale).to(dtype)
    v = torch.randn(B, H, Sk, D, device=device).to(dtype)
    return q, k, v


def random_blocks(B, H, nq, nk, kmax, device, min_count=0):
    """Distinct random key block ids per query block and random counts."""
    scores = torch.rand(B, H, nq, nk, device=device)
    indices = scores.argsort(-1)[..., :kmax].to(torch.int32).contiguous()
    counts = torch.randint(min_count, kmax + 1, (B, H, nq), device=device, dtype=torch.int32)
    return indices, counts


def dense_attention(q, k, v, mask, sm_scale=None, upcast=True):
    """Masked dense attention; ``upcast=False`` computes in the inputs' dtype (the ``pt`` of the rule).

    Rows with no allowed key give 0. Differentiable, so it also yields reference gradients.
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s.float() if not upcast else s, dim=-1).to(dtype)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v


def low_precision_attention(q, k, v, indices, counts, gq, gk, sm_scale=None, dout=None):
    """The ``pt`` of the tolerance rule for block-sparse attention: dense masked attention
    computed in the inputs' dtype; with ``dout``, its gradients ``(dq, dk, dv)`` instead."""
    mask = reference.dense_block_mask(indices, counts, gq, gk)
    if dout is None:
        return dense_attention(q, k, v, mask, sm_scale, upcast=False)
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = dense_attention(q, k, v, mask, sm_scale, upcast=False)
    return torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


def geom(latent, chunk):
    return ChunkGeometry(tuple(latent), tuple(chunk))


__all__ = [
    "assert_close_rule", "make_qkv", "random_blocks", "dense_attention", "low_precision_attention", "geom", "reference",
]


# Chunk shapes giving block capacities 64 and 128.
CAP_CHUNKS = {64: (4, 4, 4), 128: (4, 4, 8)}


def odd_geoms(cap_q, cap_k):
    """Non-divisible latents, Sq != Sk, chunk shapes of the given capacities for q and k."""
    return geom((5, 9, 10), CAP_CHUNKS[cap_q]), geom((6, 7, 13), CAP_CHUNKS[cap_k])


def capture_cuda_graph(fn):
    """Runs ``fn`` once on a side stream (capture needs warm kernels and its own allocations),
    then captures it; returns the graph and the captured call's outputs, which each replay
    writes again."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, captured


def rows_past_4gib(cap, dtype):
    """q, k, v side by side in one buffer (like a fused projection): one block of ``cap`` rows,
    head dim 128, whose rows lie so far apart (a row stride of ~2^31 / cap elements) that a
    row's byte offset from the block's first row passes 2^32 (the sm80 kernels' 32-bit
    row-offset tables must step aside). The 4.3 GB buffer is written only at the rows the views
    cover. Returns (q, k, v, geometry, indices, counts), the one block selecting itself; skips
    the test where the GPU has no room."""
    g = geom(CAP_CHUNKS[cap], CAP_CHUNKS[cap])
    esize = torch.empty((), dtype=dtype).element_size()
    stride = -(-(2**32 // esize // (cap - 1) + 1) // 8) * 8  # a multiple of 8 elements (16-byte rows)
    assert (cap - 1) * stride * esize >= 2**32
    numel = (cap - 1) * stride + 3 * 128
    if torch.cuda.mem_get_info()[0] < numel * esize + (1 << 30):
        pytest.skip(f"needs {(numel * esize + (1 << 30)) / 1e9:.1f} GB of free GPU memory")
    buf = torch.empty(numel, dtype=dtype, device="cuda")
    views = [buf.as_strided((1, 1, cap, 128), (numel, numel, stride, 1), 128 * i) for i in range(3)]
    for x in views:
        x.copy_(torch.randn(1, 1, cap, 128, device="cuda").to(dtype))
    counts = torch.ones(1, 1, 1, dtype=torch.int32, device="cuda")
    return (*views, g, torch.zeros(1, 1, 1, 1, dtype=torch.int32, device="cuda"), counts)
