"""The hand-written CUDA kernels (csrc/) against the fp64 reference (SPEC §2-3).

Every test needs a GPU and the compiled ``bsa_ext/_cuda`` library; they skip cleanly
otherwise (nothing here touches the GPU at import). Outputs are allocated inside the
C++ binding, so "poisoning" fills torch's cached blocks of the same sizes with NaN /
junk just before each call: an element the kernel forgets to write then fails.
"""

import math

import pytest
import torch

from bsa_ext import _library, reference
from bsa_ext.layout import selection_width, topk_count

from helpers import (
    CAP_CHUNKS, assert_close_rule, capture_cuda_graph, dense_attention, geom, make_qkv, odd_geoms, random_blocks,
    rows_past_4gib,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not _library.has_cuda_kernel("cuda_forward"),
        reason=f"no CUDA kernels: {_library.CUDA_LOAD_ERROR or 'no GPU'}",
    ),
]

# Forward tests run on both kernel families where the GPU has both, and on both K/V buffer
# variants of the sm80 64-key forward (conftest's kernel_family).
both_families = pytest.mark.usefixtures("kernel_family")


def _poison(*shapes_dtypes):
    """Leave NaN (floats) or junk (ints) in the cached blocks the next allocations will reuse."""
    junk = [torch.full(s, float("nan") if d.is_floating_point else -123457, dtype=d, device="cuda") for s, d in shapes_dtypes]
    del junk


def cuda_forward(q, k, v, indices, counts, gq, gk, sm_scale):
    B, H, Sq, D = q.shape
    _poison(((B, H, Sq, D), q.dtype), ((B, H, Sq), torch.float32))
    return torch.ops.bsa.cuda_forward(q, k, v, indices, counts, gq.as_ints(), gk.as_ints(), sm_scale)


def cuda_select(q, k, gq, gk, sparsity, cdf, max_blocks):
    topk = topk_count(gk.num_blocks, sparsity) if sparsity is not None else 0
    width = selection_width(gk.num_blocks, sparsity, cdf, max_blocks)
    B, H = q.shape[:2]
    _poison(((B, H, gq.num_blocks, width), torch.int32), ((B, H, gq.num_blocks), torch.int32))
    return torch.ops.bsa.cuda_select_blocks(q, k, gq.as_ints(), gk.as_ints(), topk, -1.0 if cdf is None else cdf, width)


def _check_forward(q, k, v, indices, counts, gq, gk, sm_scale):
    out, lse = cuda_forward(q, k, v, indices, counts, gq, gk, sm_scale)
    ref_out, ref_lse = reference.attention_forward(q, k, v, indices, counts, gq, gk, sm_scale)
    assert out.dtype == q.dtype and out.shape == q.shape and out.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    mask = reference.dense_block_mask(indices, counts, gq, gk)
    pt = dense_attention(q, k, v, mask, sm_scale, upcast=False)
    assert_close_rule(out, ref_out, pt, "out")
    assert not torch.isnan(lse).any()
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    if (~empty).any():
        finite = ref_lse[~empty]
        tol = 1e-5 * max(1.0, finite.abs().max().item())
        assert (lse[~empty].double() - finite).abs().max().item() <= tol
    return out, lse


# ------------------------------------------------------------------ forward
@both_families
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("cap_q,cap_k", [(64, 64), (64, 128), (128, 64), (128, 128)])
@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_forward_matches_reference(dtype, D, cap_q, cap_k, scale):
    gq, gk = odd_geoms(cap_q, cap_k)
    B, H = 2, 2
    q, k, v = make_qkv(B, H, gq.seq_len, gk.seq_len, D, dtype, "cuda", scale=scale)
    indices, counts = random_blocks(B, H, gq.num_blocks, gk.num_blocks, min(5, gk.num_blocks), "cuda")
    _check_forward(q, k, v, indices, counts, gq, gk, D**-0.5)


@both_families
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cap", [64, 128])
def test_forward_strided_views_of_fused_qkv_and_custom_scale(dtype, cap):
    # Batch stride != heads * head stride: the sm90 path encodes one tensor map per batch element.
    gq = gk = geom((6, 9, 11), CAP_CHUNKS[cap])
    q, k, v = make_qkv(2, 3, gq.seq_len, gk.seq_len, 128, dtype, "cuda", scale=4.0, fused=True)
    assert not q.is_contiguous() and q.stride(-1) == 1
    indices, counts = random_blocks(2, 3, gq.num_blocks, gk.num_blocks, 4, "cuda", min_count=1)
    _check_forward(q, k, v, indices, counts, gq, gk, 0.05)


@both_families
@pytest.mark.parametrize("cap", [64, 128])
def test_forward_rows_more_than_4gib_apart(cap):
    # Row offsets within a block past 32 bits: the sm80 kernels copy such blocks row by row.
    q, k, v, g, indices, counts = rows_past_4gib(cap, torch.bfloat16)
    _check_forward(q, k, v, indices, counts, g, g, 128**-0.5)


@both_families
@pytest.mark.parametrize("cap_q", [64, 128])
def test_forward_zero_counts(cap_q):
    gq, gk = odd_geoms(cap_q, 128)
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 64, torch.bfloat16, "cuda")
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 3, "cuda", min_count=1)
    counts[0, 0, ::2] = 0
    counts[0, 1] = 0
    out, lse = _check_forward(q, k, v, indices, counts, gq, gk, 0.125)
    rows = gq.token_index("cuda")[0::2].flatten()
    rows = rows[rows >= 0]
    assert torch.all(out[0, 0, rows] == 0) and torch.all(lse[0, 0, rows] == -math.inf)
    assert torch.all(out[0, 1] == 0) and torch.all(lse[0, 1] == -math.inf)


@both_families
@pytest.mark.parametrize("cap_q", [64, 128])
def test_forward_uneven_counts_many_query_blocks(cap_q):
    # The Hopper kernel takes query blocks by descending count (bsa/schedule.cuh). With 105 or
    # 60 query blocks per row (the latter with partial edge chunks), counts from 0 to 30, one
    # row of equal counts and one with a third of its rows tied at 30, every block must still
    # be computed exactly once (outputs are poisoned before the call).
    gq = geom((12, 20, 28), CAP_CHUNKS[cap_q])
    gk = geom((12, 20, 28), CAP_CHUNKS[64])
    q, k, v = make_qkv(2, 3, gq.seq_len, gk.seq_len, 64, torch.bfloat16, "cuda", scale=2.0)
    indices, counts = random_blocks(2, 3, gq.num_blocks, gk.num_blocks, 30, "cuda")
    counts[0, 1] = 7  # equal counts: the identity order
    counts[1, 2, ::3] = 30
    _check_forward(q, k, v, indices, counts, gq, gk, 0.125)


@both_families
@pytest.mark.parametrize("cap_q,cap_k", [(64, 64), (64, 128), (128, 64), (128, 128)])
def test_forward_garbage_ids_are_skipped(cap_q, cap_k):
    gq, gk = odd_geoms(cap_q, cap_k)
    nk = gk.num_blocks
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 128, torch.float16, "cuda", scale=2.0)
    pattern = torch.tensor([-5, 1, nk, 10**6, 0, -(2**31), 2**31 - 1, nk - 1], dtype=torch.int32, device="cuda")
    indices = pattern.expand(1, 2, gq.num_blocks, pattern.numel()).contiguous()
    counts = torch.randint(1, pattern.numel() + 1, (1, 2, gq.num_blocks), dtype=torch.int32, device="cuda")
    counts[0, 0, 0] = 1  # only -5: no valid block at all
    counts[0, 1, 1] = 10**6  # past Kmax: clamped to the row
    counts[0, 1, 2] = -7  # negative: nothing
    out, lse = cuda_forward(q, k, v, indices, counts, gq, gk, 0.125)
    clamped = counts.clamp(0, pattern.numel())
    ref_out, ref_lse = reference.attention_forward(q, k, v, indices, clamped, gq, gk, 0.125)
    pt = dense_attention(q, k, v, reference.dense_block_mask(indices, clamped, gq, gk), 0.125, upcast=False)
    assert_close_rule(out, ref_out, pt)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


@pytest.mark.parametrize("cap_q", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_kv_buffer_variants_agree_bitwise(cap_q, dtype, monkeypatch):
    # One and two K/V buffers change only when tiles land, not the arithmetic: same bits.
    monkeypatch.setenv("BSA_DISABLE_SM90", "1")
    gq, gk = odd_geoms(cap_q, 64)
    q, k, v = make_qkv(2, 2, gq.seq_len, gk.seq_len, 128, dtype, "cuda", scale=4.0)
    indices, counts = random_blocks(2, 2, gq.num_blocks, gk.num_blocks, min(9, gk.num_blocks), "cuda")
    results = []
    for buffers in ("1", "2"):
        monkeypatch.setenv("BSA_SM80_KV_BUFFERS", buffers)
        results.append(cuda_forward(q, k, v, indices, counts, gq, gk, 0.1))
    (out1, lse1), (out2, lse2) = results
    assert torch.equal(out1, out2) and torch.equal(lse1, lse2)


@pytest.mark.parametrize("value", ["3", "one", "0"])
def test_forward_rejects_bad_kv_buffers_env(value, monkeypatch):
    monkeypatch.setenv("BSA_DISABLE_SM90", "1")
    monkeypatch.setenv("BSA_SM80_KV_BUFFERS", value)
    gq, gk = odd_geoms(64, 64)
    q, k, v = make_qkv(1, 1, gq.seq_len, gk.seq_len, 64, torch.bfloat16, "cuda")
    indices, counts = random_blocks(1, 1, gq.num_blocks, gk.num_blocks, 2, "cuda")
    with pytest.raises(RuntimeError, match=f"BSA_SM80_KV_BUFFERS: expected 1 or 2 \\(or unset\\), got '{value}'"):
        cuda_forward(q, k, v, indices, counts, gq, gk, 0.125)


@both_families
def test_forward_matches_triton_path():
    from bsa_ext import triton as bsa_triton

    if bsa_triton.AVAILABLE_REASON is not None:
        pytest.skip(bsa_triton.AVAILABLE_REASON)
    gq, gk = odd_geoms(64, 128)
    q, k, v = make_qkv(1, 2, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=4.0)
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 4, "cuda", min_count=1)
    out, lse = cuda_forward(q, k, v, indices, counts, gq, gk, 128**-0.5)
    t_out, t_lse = bsa_triton.forward(q, k, v, indices, counts, gq, gk, 128**-0.5)
    ref_out, _ = reference.attention_forward(q, k, v, indices, counts, gq, gk, 128**-0.5)
    # Both backends obey the same bound against the fp64 truth.
    pt = dense_attention(q, k, v, reference.dense_block_mask(indices, counts, gq, gk), 128**-0.5, upcast=False)
    assert_close_rule(out, ref_out, pt, "cuda")
    assert_close_rule(t_out, ref_out, pt, "triton")
    torch.testing.assert_close(lse, t_lse, rtol=1e-5, atol=1e-4)


def test_forward_rejects_misaligned_rows():
    gq = gk = geom((4, 4, 4), (4, 4, 4))
    x = torch.randn(1, 1, 64, 130, device="cuda", dtype=torch.float16)[..., :128]  # row stride 130: not 16B
    indices, counts = random_blocks(1, 1, 1, 1, 1, "cuda", min_count=1)
    with pytest.raises(Exception, match="multiple of 8"):
        torch.ops.bsa.cuda_forward(x, x, x, indices, counts, gq.as_ints(), gk.as_ints(), 0.1)


def test_auto_leaves_cuda_out_for_rows_it_cannot_copy():
    # The same rows through the public op: "auto" runs them elsewhere, "cuda" names the reason.
    from bsa_ext import last_backend
    from bsa_ext.ops import BackendUnavailableError

    gq = gk = geom((4, 4, 8), (4, 4, 4))
    x = torch.randn(1, 2, gq.seq_len, 130, device="cuda", dtype=torch.float16)[..., :128]
    indices, counts = random_blocks(1, 2, gq.num_blocks, gk.num_blocks, 2, "cuda", min_count=1)
    geo = (gq.latent, gk.latent, gq.chunk, gk.chunk)
    out, _ = torch.ops.bsa.forward(x, x, x, indices, counts, *geo, 0.1, "auto")
    assert last_backend("forward") != "cuda"
    ref_out, _ = reference.attention_forward(x, x, x, indices, counts, gq, gk, 0.1)
    pt = dense_attention(x, x, x, reference.dense_block_mask(indices, counts, gq, gk), 0.1, upcast=False)
    assert_close_rule(out, ref_out, pt)
    with pytest.raises(BackendUnavailableError, match=r"q: stride\(2\) = 130 elements is not a multiple of 16 bytes"):
        torch.ops.bsa.forward(x, x, x, indices, counts, *geo, 0.1, "cuda")


# ------------------------------------------------------------------ selection
def cuda_select_pooled(q, k, gq, gk, sparsity, cdf, max_blocks):
    """The same selection from blocks pooled by torch in fp32, as the context-parallel path pools."""
    topk = topk_count(gk.num_blocks, sparsity) if sparsity is not None else 0
    width = selection_width(gk.num_blocks, sparsity, cdf, max_blocks)
    qp, kp = reference.pool_blocks(q, gq).float(), reference.pool_blocks(k, gk).float()
    B, H = q.shape[:2]
    _poison(((B, H, gq.num_blocks, width), torch.int32), ((B, H, gq.num_blocks), torch.int32))
    return torch.ops.bsa.cuda_select_pooled(qp, kp, topk, -1.0 if cdf is None else cdf, width)


def _check_selection(q, k, gq, gk, sparsity, cdf, max_blocks, select=cuda_select):
    indices, counts = select(q, k, gq, gk, sparsity, cdf, max_blocks)
    ref_idx, ref_cnt = reference.select_blocks(q, k, gq, gk, sparsity, cdf, max_blocks)
    width = selection_width(gk.num_blocks, sparsity, cdf, max_blocks)
    assert indices.shape == (*q.shape[:2], gq.num_blocks, width) and indices.dtype == torch.int32
    assert counts.shape == (*q.shape[:2], gq.num_blocks) and counts.dtype == torch.int32
    if cdf is None:
        assert torch.equal(counts, ref_cnt)
    else:  # fp32 vs fp64 probabilities may move a count at the threshold by one
        assert (counts.long() - ref_cnt.long()).abs().max().item() <= 1
    assert counts.min().item() >= 1 and counts.max().item() <= width
    scores = reference.block_scores(q, k, gq, gk)
    tiny = 1e-4 * max(1.0, scores.abs().max().item())
    c = counts.long()
    live = torch.arange(width, device="cuda") < c[..., None]
    # Entries past the count are -1; the chosen ones are distinct, in range, ascending.
    assert torch.all(indices[~live] == -1)
    chosen = torch.where(live, indices.long(), torch.full_like(indices.long(), -1))
    assert torch.all(chosen[live] >= 0) and torch.all(chosen[live] < gk.num_blocks)
    nxt = chosen[..., 1:]
    assert torch.all((nxt > chosen[..., :-1]) | ~live[..., 1:]), "ids must be strictly ascending"
    # Every chosen score is >= the count-th largest score (fp64), up to fp32 rounding.
    sorted_scores = scores.sort(-1, descending=True).values
    kth = sorted_scores.gather(-1, (c - 1).clamp(min=0)[..., None])
    got = scores.gather(-1, chosen.clamp(min=0))
    assert torch.all((got >= kth - tiny) | ~live)
    # Index sets equal the reference wherever the count matches and no near-tie (beyond fp32
    # rounding of pooled dot products) sits at the boundary.
    nk = gk.num_blocks
    gap = 1e-5 * max(1.0, scores.abs().max().item())
    nxt_score = sorted_scores.gather(-1, c.clamp(max=nk - 1)[..., None])
    clear = (c == ref_cnt.long()) & ((kth - nxt_score).squeeze(-1) > gap) | (c == nk)
    ours = torch.zeros(*c.shape, nk + 1, dtype=torch.bool, device="cuda")
    ours.scatter_(-1, torch.where(live, chosen, torch.full_like(chosen, nk)), True)
    ref_live = torch.arange(ref_idx.shape[-1], device="cuda") < ref_cnt.long()[..., None]
    theirs = torch.zeros_like(ours)
    theirs.scatter_(-1, torch.where(ref_live, ref_idx.long(), torch.full_like(ref_idx.long(), nk)), True)
    assert torch.equal(ours[clear][:, :nk], theirs[clear][:, :nk])
    assert clear.float().mean().item() > 0.75
    return indices, counts


SELECT_GEOMS = [((5, 6, 9), (4, 4, 4), (8, 8, 12), (4, 4, 4)), ((3, 5, 7), (2, 2, 4), (4, 7, 9), (2, 4, 2))]
MODES = [
    (0.5, None, None), (0.9375, None, None), (0.0, None, None), (0.75, None, 2),
    (None, 0.5, None), (None, 0.98, None), (0.875, 0.9, None), (None, 0.95, 2),
]


@pytest.mark.parametrize("geoms", SELECT_GEOMS)
@pytest.mark.parametrize("sparsity,cdf,max_blocks", MODES)
@pytest.mark.parametrize("dtype,D", [(torch.float16, 64), (torch.bfloat16, 128)])
def test_selection_matches_reference(geoms, sparsity, cdf, max_blocks, dtype, D):
    gq, gk = geom(*geoms[:2]), geom(*geoms[2:])
    q = torch.randn(2, 2, gq.seq_len, D, device="cuda").to(dtype)
    k = (torch.randn(2, 2, gk.seq_len, D, device="cuda") * 3).to(dtype)
    _check_selection(q, k, gq, gk, sparsity, cdf, max_blocks)


@pytest.mark.parametrize("geoms", SELECT_GEOMS)
@pytest.mark.parametrize("sparsity,cdf,max_blocks", MODES)
@pytest.mark.parametrize("D", [64, 128])
def test_selection_from_pooled_blocks_matches_reference(geoms, sparsity, cdf, max_blocks, D):
    gq, gk = geom(*geoms[:2]), geom(*geoms[2:])
    q = torch.randn(2, 3, gq.seq_len, D, device="cuda").to(torch.bfloat16)
    k = (torch.randn(2, 3, gk.seq_len, D, device="cuda") * 3).to(torch.bfloat16)
    _check_selection(q, k, gq, gk, sparsity, cdf, max_blocks, select=cuda_select_pooled)


@pytest.mark.parametrize("nk", [300, 1300, 2700])
@pytest.mark.parametrize("sparsity,cdf", [(0.9375, None), (0.875, 0.98)])
def test_selection_from_pooled_blocks_long_rows(nk, sparsity, cdf):
    gq, gk = geom((2, 4, 12), (2, 2, 4)), geom((1, 1, 4 * nk), (1, 1, 4))
    # Peaked softmax in cdf mode, as in test_selection_key_block_counts_across_kernel_variants: a
    # near-uniform one over thousands of blocks moves fp32 counts by one, leaving few rows to compare.
    scale = 4.0 if cdf is None else 16.0
    q, k, _ = make_qkv(1, 4, gq.seq_len, gk.seq_len, 64, torch.float16, "cuda", scale=scale)
    _check_selection(q, k, gq, gk, sparsity, cdf, None, select=cuda_select_pooled)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_pool_blocks_matches_reference(dtype, D):
    for latent, chunk, fused in (((5, 6, 9), (4, 4, 4), False), ((3, 5, 7), (2, 2, 4), True), ((4, 8, 8), (4, 4, 8), False)):
        g = geom(latent, chunk)
        x, _, _ = make_qkv(2, 3, g.seq_len, g.seq_len, D, dtype, "cuda", scale=4.0, fused=fused)
        _poison(((2, 3, g.num_blocks, D), torch.float32))
        got = torch.ops.bsa.cuda_pool_blocks(x, g.as_ints())
        want = reference.pool_blocks(x, g)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # fp32 sums of at most 256 half-precision values, divided once.
        assert (got.double() - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


def test_selection_from_pooled_blocks_rejects_bad_inputs():
    qp = torch.randn(1, 2, 5, 64, device="cuda")
    kp = torch.randn(1, 2, 7, 64, device="cuda")
    with pytest.raises(RuntimeError, match="q_pooled: expected float32"):
        torch.ops.bsa.cuda_select_pooled(qp.half(), kp, 2, -1.0, 2)
    with pytest.raises(RuntimeError, match="k_pooled: expected a contiguous"):
        torch.ops.bsa.cuda_select_pooled(qp, kp.transpose(2, 3), 2, -1.0, 2)
    with pytest.raises(RuntimeError, match="k_pooled: batch/heads/head_dim differ"):
        torch.ops.bsa.cuda_select_pooled(qp, kp[:, :1].contiguous(), 2, -1.0, 2)
    with pytest.raises(RuntimeError, match="width must be in"):
        torch.ops.bsa.cuda_select_pooled(qp, kp, 2, -1.0, 8)
    idx, cnt = torch.ops.bsa.cuda_select_pooled(qp, kp, 7, -1.0, 7)  # every key block
    assert torch.all(cnt == 7) and torch.equal(idx, torch.arange(7, device="cuda", dtype=torch.int32).expand_as(idx))


@pytest.mark.parametrize("sparsity,cdf", [(0.9375, None), (None, 0.9), (0.99, 0.5)])
def test_selection_4096_key_blocks(sparsity, cdf):
    gq = geom((8, 16, 16), (4, 4, 4))  # 32 query blocks
    gk = geom((16, 64, 64), (4, 4, 4))  # 4096 key blocks
    q, k, _ = make_qkv(1, 1, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=4.0)
    _check_selection(q, k, gq, gk, sparsity, cdf, None)


def test_selection_strided_views_and_ties():
    gq = gk = geom((5, 6, 9), (4, 4, 4))
    q, k, _ = make_qkv(1, 2, gq.seq_len, gk.seq_len, 64, torch.float16, "cuda", scale=4.0, fused=True)
    _check_selection(q, k, gq, gk, 0.5, 0.9, None)
    equal = torch.zeros_like(k)  # every block scores 0: the smallest ids win
    indices, counts = cuda_select(q, equal, gq, gk, 0.5, None, None)
    K = topk_count(gk.num_blocks, 0.5)
    assert torch.all(counts == K)
    assert torch.equal(indices, torch.arange(K, device="cuda", dtype=torch.int32).expand_as(indices))


@pytest.mark.parametrize("nk", [1, 7, 256, 257, 768, 769, 1408, 1409, 2816, 2817, 4096, 4100])
@pytest.mark.parametrize("sparsity,cdf", [(0.9375, None), (None, 0.9), (0.875, 0.98)])
def test_selection_key_block_counts_across_kernel_variants(nk, sparsity, cdf):
    # One row of blocks (chunk (1, 1, 4)) reaches every register-width variant and the wide fallback.
    gq, gk = geom((2, 4, 12), (2, 2, 4)), geom((1, 1, 4 * nk - 1), (1, 1, 4))
    # Peaked softmax in cdf modes: a near-uniform one over thousands of blocks moves fp32 counts by one.
    scale = 4.0 if cdf is None else 16.0
    q, k, _ = make_qkv(1, 4, gq.seq_len, gk.seq_len, 64, torch.float16, "cuda", scale=scale)
    _check_selection(q, k, gq, gk, sparsity, cdf, None)


@pytest.mark.parametrize("chunk_q,chunk_k", [((2, 4, 4), (4, 2, 4)), ((3, 3, 3), (1, 1, 5)), ((4, 4, 8), (4, 4, 8))])
def test_selection_one_launch_pooling_across_heads(chunk_q, chunk_k):
    # Top-k selection pools and ranks in one launch where block capacities are multiples of 4
    # (select.cuh topk_pooled_kernel): ranking CTAs wait on per-head counters that pooling warps
    # of other CTAs fill. Many (batch, head) pairs with partial edge chunks, so that heads are
    # pooled by different CTAs than rank them; capacities 27 and 5 take the two-launch path.
    gq, gk = geom((7, 10, 13), chunk_q), geom((9, 6, 11), chunk_k)
    q, k, _ = make_qkv(3, 5, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0)
    for _ in range(2):  # a second call reuses the counters' memory: they are zeroed per call
        _check_selection(q, k, gq, gk, 0.75, None, None)


def test_topk_selection_allocates_no_score_matrix():
    # Top-k rows of up to 1408 key blocks are scored and chosen on chip (topk_fused_kernel): the
    # [B, H, Nq, Nk] fp32 score matrix, which the cdf choosers still read from global memory, is
    # never allocated. The cdf call checks that the measurement would see it.
    g = geom((16, 40, 40), (2, 4, 4))
    B, H, n = 1, 8, g.num_blocks
    # The fused path runs where two of its CTAs fit on an SM (api.h select_fused_applies).
    cta_bytes = 16 * ((n + 3) & ~3) * 4 + max(64 * 16 * 8, 8 * (256 + 128) * 4)
    if torch.cuda.get_device_properties(0).shared_memory_per_multiprocessor < 2 * (cta_bytes + 1024):
        pytest.skip("this GPU's shared memory per SM holds one fused selection CTA: the score matrix path runs")
    q, k, _ = make_qkv(B, H, g.seq_len, g.seq_len, 64, torch.float16, "cuda")
    score_bytes = B * H * n * n * 4

    def peak_extra(topk, cdf, width):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        torch.ops.bsa.cuda_select_blocks(q, k, g.as_ints(), g.as_ints(), topk, cdf, width)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    K = topk_count(n, 0.9)
    assert peak_extra(K, -1.0, K) < score_bytes / 2  # pooled blocks and indices: ~5 of 20 MB
    assert peak_extra(0, 0.9, n) >= score_bytes


@pytest.mark.parametrize("nk", [200, 1300, 2700])
@pytest.mark.parametrize("sparsity,cdf", [(0.75, None), (0.99, None), (None, 0.5), (0.5, 0.9)])
@pytest.mark.parametrize("n_patterns", [3, 60])
def test_selection_exact_ties_go_to_smaller_ids(nk, sparsity, cdf, n_patterns):
    # Key blocks repeat a few patterns, so scores tie exactly and selection must match the
    # reference: 3 patterns put hundreds of equal keys at the boundary, 60 a few dozen.
    gq, gk = geom((4, 8, 8), (4, 4, 4)), geom((1, 1, 4 * nk), (1, 1, 4))
    q = torch.randn(1, 2, gq.seq_len, 64, device="cuda").to(torch.float16)
    patterns = torch.randn(1, 2, n_patterns, 4, 64, device="cuda").to(torch.float16)
    which = torch.randint(0, n_patterns, (nk,), device="cuda")
    k = patterns[:, :, which].reshape(1, 2, 4 * nk, 64)
    indices, counts = cuda_select(q, k, gq, gk, sparsity, cdf, None)
    ref_idx, ref_cnt = reference.select_blocks(q, k, gq, gk, sparsity, cdf, None)
    if cdf is None:
        assert torch.equal(counts, ref_cnt)
    for row, (n, n_ref) in enumerate(zip(counts.flatten().tolist(), ref_cnt.flatten().tolist())):
        if n == n_ref:
            got = indices.view(-1, indices.shape[-1])[row, :n]
            want = ref_idx.view(-1, ref_idx.shape[-1])[row, :n_ref].sort().values
            assert torch.equal(got, want), f"row {row}"


@pytest.mark.parametrize("nk", [300, 1300])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_selection_non_finite_scores_stay_in_range(nk, bad):
    # A non-finite key block makes a row's score range non-finite: the choosers must still
    # return the requested count of distinct, in-range, ascending ids.
    gq, gk = geom((4, 8, 8), (4, 4, 4)), geom((1, 1, 4 * nk), (1, 1, 4))
    q = torch.randn(1, 2, gq.seq_len, 64, device="cuda").to(torch.float16)
    k = torch.randn(1, 2, gk.seq_len, 64, device="cuda").to(torch.float16)
    k[:, :, 40:44] = bad
    indices, counts = cuda_select(q, k, gq, gk, 0.9, None, None)
    K = topk_count(nk, 0.9)
    assert torch.all(counts == K)
    assert torch.all((indices >= 0) & (indices < nk))
    assert torch.all(indices[..., 1:] > indices[..., :-1])


@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_selection_scaled_inputs_fused_layout(scale):
    gq, gk = geom((9, 13, 20), (4, 4, 4)), geom((9, 13, 20), (4, 4, 8))
    q, k, _ = make_qkv(1, 3, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=scale, fused=True)
    _check_selection(q, k, gq, gk, 0.875, None, None)
    _check_selection(q, k, gq, gk, 0.875, 0.98, None)


# ------------------------------------------------------------------ graphs
def test_cuda_graph_capture_matches_eager():
    gq = gk = geom((8, 20, 24), (4, 4, 4))
    q, k, v = make_qkv(1, 4, gq.seq_len, gk.seq_len, 128, torch.bfloat16, "cuda", scale=2.0, fused=True)
    args = (gq.as_ints(), gk.as_ints())
    K = topk_count(gk.num_blocks, 0.875)

    def layer():
        idx, cnt = torch.ops.bsa.cuda_select_blocks(q, k, *args, K, 0.9, gk.num_blocks)
        out, lse = torch.ops.bsa.cuda_forward(q, k, v, idx, cnt, *args, 128**-0.5)
        return idx, cnt, out, lse

    eager = layer()
    graph, captured = capture_cuda_graph(layer)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ merge of partial attentions
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("scale", [1.0, 16.0])
def test_merge_matches_fp64(dtype, D, scale):
    from bsa_ext.distributed.sparse_cp import _merge

    B, H, S = 2, 3, 517
    out1 = torch.randn(B, H, S, D, device="cuda").to(dtype)
    out2 = torch.randn(B, H, S, D, device="cuda").to(dtype)
    lse1 = torch.randn(B, H, S, device="cuda") * scale
    lse2 = torch.randn(B, H, S, device="cuda") * scale
    # Rows where one part, or both, saw no key block: out 0, lse -inf (SPEC §3).
    lse1[0, 0, :10], out1[0, 0, :10] = -math.inf, 0
    lse2[0, 0, 5:20], out2[0, 0, 5:20] = -math.inf, 0
    _poison(((B, H, S, D), dtype), ((B, H, S), torch.float32))
    out, lse = torch.ops.bsa.cuda_merge(out1, lse1, out2, lse2)
    l1, l2 = lse1.double(), lse2.double()
    ref_lse = torch.logaddexp(l1, l2)
    base = torch.where(torch.isfinite(ref_lse), ref_lse, torch.zeros_like(ref_lse))
    ref = out1.double() * torch.exp(l1 - base)[..., None] + out2.double() * torch.exp(l2 - base)[..., None]
    pt, _ = _merge(out1, lse1, out2, lse2, "torch")
    assert out.dtype == dtype and out.shape == out1.shape and lse.shape == lse1.shape
    assert_close_rule(out, ref, pt, "out")
    empty = torch.isinf(ref_lse)
    assert int(empty.sum()) == 5
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] < 0)
    assert torch.all(out[empty] == 0)
    assert (lse[~empty].double() - ref_lse[~empty]).abs().max().item() <= 1e-6 * max(1.0, scale)


def test_merge_rejects_mismatched_inputs():
    out = torch.randn(1, 2, 33, 64, device="cuda", dtype=torch.float16)
    lse = torch.randn(1, 2, 33, device="cuda")
    with pytest.raises(RuntimeError, match="out2: dtype differs"):
        torch.ops.bsa.cuda_merge(out, lse, out.bfloat16(), lse)
    with pytest.raises(RuntimeError, match="lse2: expected float32"):
        torch.ops.bsa.cuda_merge(out, lse, out, lse.double())
    with pytest.raises(RuntimeError, match="out1: expected a contiguous"):
        torch.ops.bsa.cuda_merge(out.transpose(1, 2), lse, out, lse)
