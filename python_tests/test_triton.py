"""The Triton backend against the fp64 reference (SPEC §2-3).

Without a GPU the kernels run through Triton's CPU interpreter (fp16 only: its bf16
``tl.dot`` is unreliable); with one, the same tests run on CUDA and the ``gpu`` tests add
bf16, head dim 128 with 128-token chunks and the LongCat 720p shape.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must precede the first triton import (conftest does the same).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bsa_ext import reference  # noqa: E402
from bsa_ext.layout import selection_width, topk_count  # noqa: E402
from bsa_ext import triton as bsa_triton  # noqa: E402

from helpers import assert_close_rule, capture_cuda_graph, geom, low_precision_attention, make_qkv, random_blocks  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

pytestmark = pytest.mark.skipif(
    bsa_triton.AVAILABLE_REASON is not None or (not INTERPRET and not torch.cuda.is_available()),
    reason=f"Triton backend unavailable: {bsa_triton.AVAILABLE_REASON or 'no GPU and no interpreter'}",
)

# (latent_q, chunk_q, latent_k, chunk_k): partial edge chunks, Sq != Sk, q/k chunks differ.
GEOMETRIES = {
    "same": ((5, 6, 9), (4, 4, 4), (5, 6, 9), (4, 4, 4)),
    "cross": ((5, 6, 9), (4, 4, 4), (4, 8, 12), (4, 4, 8)),
    "cap16": ((3, 5, 7), (2, 2, 4), (3, 6, 5), (2, 4, 2)),
}


@pytest.fixture
def poisoned(monkeypatch):
    """Every tensor the backend allocates starts as NaN (or a junk int), so unwritten elements fail."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        t.fill_(float("nan") if t.is_floating_point() else -123457)
        return t

    monkeypatch.setattr(torch, "empty", empty)


def _geoms(name):
    lq, cq, lk, ck = GEOMETRIES[name]
    return geom(lq, cq), geom(lk, ck)


def _check_forward(q, k, v, indices, counts, gq, gk, sm_scale):
    out, lse = bsa_triton.forward(q, k, v, indices, counts, gq, gk, sm_scale)
    ref_out, ref_lse = reference.attention_forward(q, k, v, indices, counts, gq, gk, sm_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    pt = low_precision_attention(q, k, v, indices, counts, gq, gk, sm_scale)
    assert_close_rule(out, ref_out, pt, "out")
    assert not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    finite = ref_lse[~empty]
    # fp32 logsumexp of fp32 products: relative error a few ulps of the largest score.
    tol = 1e-5 * max(1.0, finite.abs().max().item() if finite.numel() else 1.0)
    assert (lse[~empty].double() - finite).abs().max().item() <= tol if finite.numel() else True
    return out, lse


def _check_backward(q, k, v, indices, counts, gq, gk, sm_scale):
    out, lse = bsa_triton.forward(q, k, v, indices, counts, gq, gk, sm_scale)
    dout = torch.randn_like(out)
    grads = bsa_triton.backward(dout, q, k, v, out, lse, indices, counts, gq, gk, sm_scale)
    refs = reference.attention_backward(dout, q, k, v, indices, counts, gq, gk, sm_scale)
    pts = low_precision_attention(q, k, v, indices, counts, gq, gk, sm_scale, dout)
    for name, g, ref, pt, x in zip(("dq", "dk", "dv"), grads, refs, pts, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_rule(g, ref, pt, name)
    return grads


# ------------------------------------------------------------------ forward
@pytest.mark.triton_interpret
@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_forward_matches_reference(name, scale, poisoned):
    gq, gk = _geoms(name)
    B, H, D = 2, 2, 64
    q, k, v = make_qkv(B, H, gq.seq_len, gk.seq_len, D, torch.float16, DEVICE, scale=scale)
    indices, counts = random_blocks(B, H, gq.num_blocks, gk.num_blocks, min(3, gk.num_blocks), DEVICE, min_count=1)
    _check_forward(q, k, v, indices, counts, gq, gk, D**-0.5)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("D", [96, 128])
def test_forward_head_dims_and_custom_scale(D, poisoned):
    gq, gk = _geoms("cross")
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, D, torch.float16, DEVICE, scale=2.0)
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 2, DEVICE, min_count=1)
    _check_forward(q, k, v, indices, counts, gq, gk, 0.05)


@pytest.mark.triton_interpret
def test_zero_counts_give_zero_output_and_minus_inf_lse(poisoned):
    gq, gk = _geoms("same")
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 64, torch.float16, DEVICE)
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 3, DEVICE, min_count=1)
    counts[0, 0, ::2] = 0
    counts[0, 1] = 0  # a whole head without keys
    out, lse = _check_forward(q, k, v, indices, counts, gq, gk, 0.125)
    rows = gq.token_index(DEVICE)[0::2].flatten()
    rows = rows[rows >= 0]
    assert torch.all(out[0, 0, rows] == 0) and torch.all(lse[0, 0, rows] == -math.inf)
    assert torch.all(out[0, 1] == 0) and torch.all(lse[0, 1] == -math.inf)
    dq, dk, dv = bsa_triton.backward(torch.randn_like(out), q, k, v, out, lse, indices, counts, gq, gk, 0.125)
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.all(dq[0, 0, rows] == 0) and torch.all(dq[0, 1] == 0)
    assert torch.all(dk[0, 1] == 0) and torch.all(dv[0, 1] == 0)


@pytest.mark.triton_interpret
def test_garbage_ids_are_skipped(poisoned):
    gq, gk = _geoms("cross")
    nk = gk.num_blocks
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 64, torch.float16, DEVICE, scale=2.0)
    pattern = torch.tensor([-5, 1, nk, 10**6, 0, -(2**31)], dtype=torch.int32, device=DEVICE)
    indices = pattern.expand(1, 2, gq.num_blocks, pattern.numel()).contiguous()
    counts = torch.randint(1, pattern.numel() + 1, (1, 2, gq.num_blocks), dtype=torch.int32, device=DEVICE)
    counts[0, 0, 0] = 1  # only -5: no valid block at all
    counts[0, 1, 1] = 10**6  # past Kmax: clamped to the index row
    out, lse = bsa_triton.forward(q, k, v, indices, counts, gq, gk, 0.125)
    ref_out, ref_lse = reference.attention_forward(q, k, v, indices, counts.clamp(max=pattern.numel()), gq, gk, 0.125)
    assert not torch.isnan(out).any()
    assert (out.double() - ref_out).abs().max().item() < 2e-3
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    _check_backward(q, k, v, indices, counts.clamp(max=pattern.numel()), gq, gk, 0.125)


@pytest.mark.triton_interpret
def test_strided_views_of_fused_qkv(poisoned):
    gq = gk = geom((4, 8, 8), (4, 4, 4))
    q, k, v = make_qkv(2, 2, gq.seq_len, gk.seq_len, 64, torch.float16, DEVICE, scale=4.0, fused=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    indices, counts = random_blocks(2, 2, gq.num_blocks, gk.num_blocks, 2, DEVICE, min_count=1)
    _check_forward(q, k, v, indices, counts, gq, gk, 64**-0.5)
    _check_backward(q, k, v, indices, counts, gq, gk, 64**-0.5)


@pytest.mark.triton_interpret
def test_duplicate_ids_count_twice(poisoned):
    gq, gk = _geoms("same")
    q, k, v = make_qkv(1, 1, gq.seq_len, gk.seq_len, 64, torch.float16, DEVICE)
    indices = torch.tensor([3, 3, 0], dtype=torch.int32, device=DEVICE).expand(1, 1, gq.num_blocks, 3).contiguous()
    counts = torch.full((1, 1, gq.num_blocks), 3, dtype=torch.int32, device=DEVICE)
    _check_forward(q, k, v, indices, counts, gq, gk, 0.125)
    _check_backward(q, k, v, indices, counts, gq, gk, 0.125)


# ------------------------------------------------------------------ backward
@pytest.mark.triton_interpret
@pytest.mark.parametrize("name", ["same", "cross", "cap16"])
@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_backward_matches_reference(name, scale, poisoned):
    gq, gk = _geoms(name)
    B, H, D = 1, 2, 64
    q, k, v = make_qkv(B, H, gq.seq_len, gk.seq_len, D, torch.float16, DEVICE, scale=scale)
    indices, counts = random_blocks(B, H, gq.num_blocks, gk.num_blocks, min(3, gk.num_blocks), DEVICE, min_count=1)
    _check_backward(q, k, v, indices, counts, gq, gk, D**-0.5)


@pytest.mark.triton_interpret
def test_backward_head_dim_128(poisoned):
    gq, gk = _geoms("cross")
    q, k, v = make_qkv(1, 1, gq.seq_len, gk.seq_len, 128, torch.float16, DEVICE, scale=4.0)
    indices, counts = random_blocks(1, 1, gq.num_blocks, gk.num_blocks, 3, DEVICE, min_count=1)
    _check_backward(q, k, v, indices, counts, gq, gk, 128**-0.5)


def test_inverse_index_lists_selecting_query_blocks():
    from bsa_ext.triton.backward import inverse_index

    nk = 5
    indices = torch.tensor([[[4, 1, 9], [1, -1, 1], [0, 4, 2]]], dtype=torch.int32, device=DEVICE)
    counts = torch.tensor([[2, 3, 1]], dtype=torch.int32, device=DEVICE)
    qlist, offsets = inverse_index(indices, counts, nk)
    lists = [qlist[0, offsets[0, j]:offsets[0, j + 1]].tolist() for j in range(nk)]
    assert lists == [[2], [0, 1, 1], [], [], [0]]


# ------------------------------------------------------------------ selection
def _select_from_pooled(q, k, gq, gk, sparsity, cdf, max_blocks):
    """The Triton choice from blocks pooled elsewhere (the context-parallel path's entry)."""
    qp, kp = reference.pool_blocks(q, gq).float(), reference.pool_blocks(k, gk).float()
    return bsa_triton.select_pooled(qp, kp, sparsity, cdf, max_blocks)


def _check_selection(q, k, gq, gk, sparsity, cdf, max_blocks, exact=True, select=bsa_triton.select_blocks):
    indices, counts = select(q, k, gq, gk, sparsity, cdf, max_blocks)
    ref_idx, ref_cnt = reference.select_blocks(q, k, gq, gk, sparsity, cdf, max_blocks)
    width = selection_width(gk.num_blocks, sparsity, cdf, max_blocks)
    assert indices.shape == (*q.shape[:2], gq.num_blocks, width) and indices.dtype == torch.int32
    assert counts.shape == q.shape[:2] + (gq.num_blocks,) and counts.dtype == torch.int32
    scores = reference.block_scores(q, k, gq, gk)
    tiny = 1e-4 * max(1.0, scores.abs().max().item())
    if exact:
        assert torch.equal(counts, ref_cnt)
    else:  # fp32 vs fp64 probabilities may move a count at the threshold by one
        assert (counts.long() - ref_cnt.long()).abs().max().item() <= 1
    assert counts.min().item() >= 1 and counts.max().item() <= width
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(gq.num_blocks):
                c = int(counts[b, h, i])
                chosen = indices[b, h, i, :c].long()
                assert chosen.min() >= 0 and chosen.max() < gk.num_blocks and chosen.unique().numel() == c
                row = scores[b, h, i]
                kth = row.sort(descending=True).values[c - 1]
                assert torch.all(row[chosen] >= kth - tiny)
                # Documented order: descending score.
                assert torch.all(row[chosen][1:] <= row[chosen][:-1] + tiny)
                if exact and c == int(ref_cnt[b, h, i]):
                    assert set(chosen.tolist()) == set(ref_idx[b, h, i, :c].tolist()), (b, h, i)
    return indices, counts


SELECT_GEOMS = [((5, 6, 9), (4, 4, 4), (8, 8, 12), (4, 4, 4)), ((3, 5, 7), (2, 2, 4), (4, 7, 9), (2, 4, 2))]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("geoms", SELECT_GEOMS)
@pytest.mark.parametrize("sparsity,cdf,max_blocks", [
    (0.5, None, None), (0.9375, None, None), (0.0, None, None), (0.75, None, 2),
    (None, 0.5, None), (None, 0.98, None), (None, 1.0, None), (0.875, 0.9, None), (None, 0.95, 2),
])
def test_selection_matches_reference(geoms, sparsity, cdf, max_blocks, poisoned):
    gq, gk = geom(*geoms[:2]), geom(*geoms[2:])
    q = torch.randn(2, 2, gq.seq_len, 64, device=DEVICE).to(torch.float16)
    k = (torch.randn(2, 2, gk.seq_len, 64, device=DEVICE) * 3).to(torch.float16)
    _check_selection(q, k, gq, gk, sparsity, cdf, max_blocks)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("sparsity,cdf,max_blocks", [(0.9375, None, None), (None, 0.9, None), (0.875, 0.98, 3)])
def test_selection_from_pooled_blocks(sparsity, cdf, max_blocks, poisoned):
    gq, gk = geom(*SELECT_GEOMS[0][:2]), geom(*SELECT_GEOMS[0][2:])
    q = torch.randn(2, 2, gq.seq_len, 64, device=DEVICE).to(torch.float16)
    k = (torch.randn(2, 2, gk.seq_len, 64, device=DEVICE) * 3).to(torch.float16)
    _check_selection(q, k, gq, gk, sparsity, cdf, max_blocks, select=_select_from_pooled)


@pytest.mark.triton_interpret
def test_selection_ties_go_to_smaller_ids(poisoned):
    gq = geom((4, 8, 8), (4, 4, 4))
    gk = geom((4, 8, 16), (4, 4, 4))  # 8 key blocks, all full
    D = 64
    q = torch.randn(1, 2, gq.seq_len, D, device=DEVICE).to(torch.float16)
    base = torch.randn(gk.capacity, D, device=DEVICE)
    blocks = torch.randn(gk.num_blocks, gk.capacity, D, device=DEVICE) * 0.1
    blocks[[2, 5, 6]] = base * 3  # three identical blocks, pooled to the same bits
    tok = gk.token_index(DEVICE)
    k = torch.empty(1, 2, gk.seq_len, D, device=DEVICE)
    k[:, :, tok.flatten()] = blocks.flatten(0, 1)
    k = k.to(torch.float16)
    # Align every query block with the shared pooled key so the three tie at the top.
    q = q * 0.01 + reference.pool_blocks(k, gk)[0, 0, 2].to(q.device, torch.float16)
    indices, counts = bsa_triton.select_blocks(q, k, gq, gk, 0.75, None, None)  # K = 2
    assert torch.all(counts == 2)
    assert indices[..., :2].tolist() == [[[[2, 5]] * gq.num_blocks] * 2]
    equal = torch.zeros_like(k)  # all blocks score alike: the smallest ids win
    indices, counts = bsa_triton.select_blocks(q, equal, gq, gk, 0.5, None, None)
    assert indices.tolist() == [[[[0, 1, 2, 3]] * gq.num_blocks] * 2]
    indices, counts = bsa_triton.select_blocks(q, equal, gq, gk, None, 0.3, None)
    assert torch.all(counts == 3) and torch.all(indices[..., :3] == torch.arange(3, device=DEVICE, dtype=torch.int32))


@pytest.mark.triton_interpret
def test_selection_strided_and_pooling(poisoned):
    from bsa_ext.triton.select import pool

    gq = gk = geom((5, 6, 9), (4, 4, 4))
    q, k, _ = make_qkv(1, 2, gq.seq_len, gk.seq_len, 64, torch.float16, DEVICE, scale=4.0, fused=True)
    pooled = pool(k, gk).view(1, 2, gk.num_blocks, 64)
    torch.testing.assert_close(pooled.double(), reference.pool_blocks(k, gk), rtol=1e-5, atol=1e-5)
    _check_selection(q, k, gq, gk, 0.5, 0.9, None)


# ------------------------------------------------------------------ GPU only
def _gpu_case(latent_q, chunk_q, latent_k, chunk_k, B, H, D, dtype, scale, sparsity, backward=True):
    gq, gk = geom(latent_q, chunk_q), geom(latent_k, chunk_k)
    q, k, v = make_qkv(B, H, gq.seq_len, gk.seq_len, D, dtype, "cuda", scale=scale)
    indices, counts = bsa_triton.select_blocks(q, k, gq, gk, sparsity, None, None)
    assert torch.all(counts == topk_count(gk.num_blocks, sparsity))
    _check_forward(q, k, v, indices, counts, gq, gk, D**-0.5)
    if backward:
        _check_backward(q, k, v, indices, counts, gq, gk, D**-0.5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,chunk_q,chunk_k", [
    (64, (4, 4, 4), (4, 4, 4)), (128, (4, 4, 8), (4, 4, 8)), (128, (4, 4, 4), (4, 4, 8)),
])
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_gpu_dtypes_and_capacities(dtype, D, chunk_q, chunk_k, scale, poisoned):
    _gpu_case((9, 12, 20), chunk_q, (8, 13, 18), chunk_k, 2, 2, D, dtype, scale, 0.75)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("chunk", [(2, 2, 4), (2, 4, 4), (4, 8, 8)])
def test_gpu_small_and_large_capacities(dtype, chunk, poisoned):
    _gpu_case((7, 10, 18), chunk, (7, 10, 18), chunk, 1, 2, 128, dtype, 4.0, 0.75)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [32, 96, 256])
def test_gpu_other_head_dims(dtype, D, poisoned):
    _gpu_case((5, 12, 20), (4, 4, 4), (6, 12, 18), (4, 4, 8), 1, 2, D, dtype, 4.0, 0.75)


@pytest.mark.gpu
def test_gpu_longcat_shape(poisoned):
    _gpu_case((8, 44, 80), (4, 4, 4), (8, 44, 80), (4, 4, 4), 1, 2, 128, torch.bfloat16, 4.0, 0.9375)


@pytest.mark.gpu
def test_gpu_longcat_selection_and_cuda_graph():
    gq = gk = geom((8, 44, 80), (4, 4, 4))
    q, k, v = make_qkv(1, 4, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0, fused=True)
    for sparsity, cdf in [(0.9375, None), (0.875, 0.98), (None, 0.9)]:
        _check_selection(q, k, gq, gk, sparsity, cdf, None, exact=False)
    indices, counts = bsa_triton.select_blocks(q, k, gq, gk, 0.9375, None, None)
    out, _ = bsa_triton.forward(q, k, v, indices, counts, gq, gk, 128**-0.5)

    def layer():
        g_idx, g_cnt = bsa_triton.select_blocks(q, k, gq, gk, 0.9375, None, None)
        return g_idx, bsa_triton.forward(q, k, v, g_idx, g_cnt, gq, gk, 128**-0.5)[0]

    graph, (g_idx, g_out) = capture_cuda_graph(layer)  # its warm-up call compiles every kernel
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(g_idx, indices) and torch.equal(g_out, out)
