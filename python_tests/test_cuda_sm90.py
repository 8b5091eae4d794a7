"""The Hopper (sm_90a) forward kernel against the fp64 reference and the sm80 kernel.

On an sm_90 GPU ``torch.ops.bsa.cuda_forward`` runs the wgmma/TMA kernel; env
``BSA_DISABLE_SM90=1`` (read at every call) forces the sm80 kernel, which gives the A/B
comparisons here. Marked ``sm90``: conftest skips these without an sm_90 GPU.
"""

import os

import pytest
import torch

from bsa_ext import _library, reference

from helpers import (
    CAP_CHUNKS, assert_close_rule, capture_cuda_graph, dense_attention, geom, make_qkv, odd_geoms, random_blocks,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.sm90,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _library.has_cuda_kernel("cuda_forward"),
        reason=f"no CUDA kernels: {_library.CUDA_LOAD_ERROR or 'no GPU'}",
    ),
]

def _poison(*shapes_dtypes):
    """Leave NaN in the cached blocks the binding's next allocations will reuse."""
    junk = [torch.full(s, float("nan"), dtype=d, device="cuda") for s, d in shapes_dtypes]
    del junk


def _forward(q, k, v, indices, counts, gq, gk, sm_scale, sm90=True):
    B, H, Sq, D = q.shape
    old = os.environ.pop("BSA_DISABLE_SM90", None)
    if not sm90:
        os.environ["BSA_DISABLE_SM90"] = "1"
    try:
        _poison(((B, H, Sq, D), q.dtype), ((B, H, Sq), torch.float32))
        return torch.ops.bsa.cuda_forward(q, k, v, indices, counts, gq.as_ints(), gk.as_ints(), sm_scale)
    finally:
        os.environ.pop("BSA_DISABLE_SM90", None)
        if old is not None:
            os.environ["BSA_DISABLE_SM90"] = old


def _check(q, k, v, indices, counts, gq, gk, sm_scale):
    """sm90 output vs fp64 truth (tolerance rule) and vs the sm80 kernel; returns (out, lse)."""
    out, lse = _forward(q, k, v, indices, counts, gq, gk, sm_scale)
    torch.cuda.synchronize()
    clamped = counts.clamp(0, indices.shape[-1])
    ref_out, ref_lse = reference.attention_forward(q, k, v, indices, clamped, gq, gk, sm_scale)
    mask = reference.dense_block_mask(indices, clamped, gq, gk)
    pt = dense_attention(q, k, v, mask, sm_scale, upcast=False)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert_close_rule(out, ref_out, pt, "sm90 out")
    assert not torch.isnan(lse).any(), "sm90 lse: NaN (unwritten or invalid)"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    if (~empty).any():
        finite = ref_lse[~empty]
        tol = 1e-5 * max(1.0, finite.abs().max().item())
        assert (lse[~empty].double() - finite).abs().max().item() <= tol
    out80, lse80 = _forward(q, k, v, indices, counts, gq, gk, sm_scale, sm90=False)
    assert_close_rule(out80, ref_out, pt, "sm80 out")
    # Both kernels sit within the same bound of the truth, hence within twice it of each other.
    bound = 2 * (pt.double() - ref_out).abs().max().item() + 1e-5 * max(1.0, ref_out.abs().max().item())
    assert (out.double() - out80.double()).abs().max().item() <= 2 * bound
    torch.testing.assert_close(lse, lse80, rtol=1e-5, atol=1e-4)
    return out, lse


# (latent_q, latent_k): partial edge chunks in every direction, Sq != Sk, odd query-block counts.
LATENTS = [((5, 9, 10), (6, 7, 13)), ((4, 9, 12), (9, 5, 7))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("cap_q,cap_k", [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_sm90_matches_reference_and_sm80(dtype, D, cap_q, cap_k, scale):
    lq, lk = LATENTS[int(scale) % 2]
    gq, gk = geom(lq, CAP_CHUNKS[cap_q]), geom(lk, CAP_CHUNKS[cap_k])
    B, H = 2, 2
    q, k, v = make_qkv(B, H, gq.seq_len, gk.seq_len, D, dtype, "cuda", scale=scale)
    # Up to every key block: the K/V rings wrap around several times.
    indices, counts = random_blocks(B, H, gq.num_blocks, gk.num_blocks, gk.num_blocks, "cuda")
    _check(q, k, v, indices, counts, gq, gk, D**-0.5)


def test_sm90_single_head_and_batch():
    gq, gk = geom((8, 12, 20), (4, 4, 4)), geom((8, 12, 20), (4, 4, 8))
    q, k, v = make_qkv(1, 1, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0)
    indices, counts = random_blocks(1, 1, gq.num_blocks, gk.num_blocks, 9, "cuda", min_count=1)
    _check(q, k, v, indices, counts, gq, gk, 128**-0.5)


@pytest.mark.parametrize("latent_q", [(4, 4, 4), (4, 4, 8), (4, 8, 8), (4, 4, 20), (4, 4, 28)])
def test_sm90_query_block_counts_not_a_multiple_of_the_consumers(latent_q):
    # 64-row query and key blocks at head dim 128 run three query blocks per CTA (one per
    # consumer warpgroup): 1, 2, 4, 5 and 7 query blocks leave the last CTA of each head with
    # one or two, and the others idle. Some rows have no key block at all.
    gq, gk = geom(latent_q, (4, 4, 4)), geom((6, 7, 13), (4, 4, 4))
    indices, counts = random_blocks(2, 3, gq.num_blocks, gk.num_blocks, 6, "cuda")
    counts[0, 1, 0] = 0
    q, k, v = make_qkv(2, 3, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0)
    _check(q, k, v, indices, counts, gq, gk, 128**-0.5)


@pytest.mark.parametrize("cap_q,cap_k", [(64, 64), (64, 128)])
def test_sm90_shared_key_blocks_of_neighbouring_queries(cap_q, cap_k):
    # Neighbouring query blocks (often in one CTA) with sorted lists, as selection writes them:
    # identical, overlapping and disjoint rows.
    gq, gk = odd_geoms(cap_q, cap_k)
    nq, nk = gq.num_blocks, gk.num_blocks
    indices, counts = random_blocks(1, 2, nq, nk, min(8, nk), "cuda", min_count=1)
    indices = indices.sort(-1).values.contiguous()
    indices[0, 0, 1::2] = indices[0, 0, 0::2]  # identical neighbours
    indices[0, 1, 1::4] = torch.arange(nk - 8, nk, dtype=torch.int32, device="cuda")  # disjoint tails
    counts[0, 0, 1::2] = counts[0, 0, 0::2]
    counts[0, 1, 3::4] = 0  # a neighbour with nothing
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=4.0)
    _check(q, k, v, indices, counts, gq, gk, 128**-0.5)


def test_sm90_many_heads_long_lists():
    # Enough CTAs to fill the GPU several times, lists longer than any ring.
    gq = gk = geom((8, 20, 24), (4, 4, 4))
    q, k, v = make_qkv(1, 8, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=4.0)
    indices, counts = random_blocks(1, 8, gq.num_blocks, gk.num_blocks, 40, "cuda", min_count=20)
    out, lse = _forward(q, k, v, indices, counts, gq, gk, 128**-0.5)
    out80, lse80 = _forward(q, k, v, indices, counts, gq, gk, 128**-0.5, sm90=False)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), out80.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, lse80, rtol=1e-5, atol=1e-4)


def test_sm90_kernel_is_the_one_that_runs():
    gq = gk = geom((4, 8, 8), (4, 4, 4))
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda")
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 2, "cuda", min_count=1)

    def kernel_names(sm90):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            _forward(q, k, v, indices, counts, gq, gk, 0.1, sm90=sm90)
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if "forward" in e.name]

    assert any("sm90" in n for n in kernel_names(True)), kernel_names(True)
    assert not any("sm90" in n for n in kernel_names(False))


def test_sm90_cuda_graph_capture_matches_eager():
    gq = gk = geom((8, 20, 24), (4, 4, 4))
    q, k, v = make_qkv(1, 4, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0, fused=True)
    indices, counts = random_blocks(1, 4, gq.num_blocks, gk.num_blocks, 12, "cuda", min_count=1)
    args = (indices, counts, gq.as_ints(), gk.as_ints(), 128**-0.5)
    eager = torch.ops.bsa.cuda_forward(q, k, v, *args)
    graph, captured = capture_cuda_graph(lambda: torch.ops.bsa.cuda_forward(q, k, v, *args))
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


@pytest.mark.parametrize("D", [64, 128])
def test_sm90_neighbours_with_lists_in_any_order(D):
    # The three query blocks of a 64/64 CTA with lists that are disjoint, in opposite orders,
    # interleaved, with out-of-range ids, short or empty: each must still get exactly its own
    # attention (a kernel that shares loads between neighbours must not mix their lists).
    gq, gk = geom((4, 8, 12), (4, 4, 4)), geom((6, 20, 24), (4, 4, 4))  # 6 query, 60 key blocks
    nq, nk, kmax = gq.num_blocks, gk.num_blocks, 24
    assert nq == 6 and nk == 60
    up = torch.arange(kmax, dtype=torch.int32)
    rows = [
        up,                        # 0 .. 23
        up + 36,                   # 36 .. 59: disjoint from row 0, after it
        (up + 36).flip(0),         # 59 .. 36: the same set as row 1, opposite order
        up * 2 + 1,                # odd ids 1 .. 47, interleaved with rows 0 and 1
        torch.where(up % 5 == 2, torch.tensor(-3, dtype=torch.int32), up + 10),  # out-of-range ids among 10 .. 33
        torch.where(up % 7 == 3, torch.tensor(nk + 4, dtype=torch.int32), up + 20),
    ]
    indices = torch.stack(rows).view(1, 1, nq, kmax).repeat(1, 2, 1, 1)
    counts = torch.full((1, 2, nq), kmax, dtype=torch.int32)
    counts[0, 1, 1] = 0
    counts[0, 1, 3] = 5
    indices[0, 1] = indices[0, 1].roll(1, dims=0)  # other neighbours share a CTA in head 1
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, D, torch.bfloat16, "cuda", scale=4.0)
    _check(q, k, v, indices.cuda().contiguous(), counts.cuda(), gq, gk, D**-0.5)


def test_sm90_long_lists_of_64_key_blocks():
    # 300 to 360 key blocks per query block (cdf-mode lengths): every ring wraps many times.
    gq, gk = geom((4, 8, 12), (4, 4, 4)), geom((12, 40, 48), (4, 4, 4))
    assert gk.num_blocks == 360
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, gk.num_blocks, "cuda", min_count=300)
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0)
    _check(q, k, v, indices, counts, gq, gk, 128**-0.5)
